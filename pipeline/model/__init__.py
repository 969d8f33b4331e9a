"""Pure nn.Modules and what they compute: no rank, no I/O.

rnn.py       rnn_scratch (the chapter's tanh RNN), nn.RNN/GRU/LSTM models, build_model
adaptive.py  adaptive input and output layers
loss.py      cross-entropy over half-precision logits; perplexity, bits/char
noise.py     dropout and weight-drop masks as pure functions of (seed, step, stream)
"""
