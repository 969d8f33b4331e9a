// lyrics-rnn in the browser: the exported folder's model.safetensors and config.json, run in
// plain JavaScript (no framework, nothing fetched but this folder's files).
//
// The models are pipeline/model.py's, inference only (dropout off), one character a step:
//   rnn_scratch  h = tanh(W_xh[x] + b_h + h W_hh), logits = h W_hq + b_q
//   rnn/gru/lstm an embedding (or the adaptive input), one torch cell per layer (nn.RNN,
//                nn.GRU, nn.LSTM gate orders), then a linear output (or the adaptive
//                softmax's log-probabilities); a tied output reads the embedding's matrix.
// Weights and every activation are float32 arrays like the model's; dot products sum in
// float32 (WebAssembly SIMD, four partial sums) or float64 (the plain JavaScript fallback),
// rounded when stored, so greedy text matches PyTorch's unless two logits lie within
// float32 rounding of each other.
//
// The page's URL can carry a sample: index.html?prefix=分开&length=100 generates on load
// (greedy unless it also gives temperature, top_k and seed).
"use strict";

const UNK = "<unk>";

// ------------------------------------------------------------------ loading

function readSafetensors(buf) {
  // 8 bytes little-endian header length, a JSON header, then the raw tensors
  const view = new DataView(buf);
  const n = Number(view.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 8, n)));
  delete header.__metadata__;
  // weights, their transposed or joined copies and the activations share one heap
  makeHeap(2 * (buf.byteLength - 8 - n) + (4 << 20));
  const tensors = {};
  for (const [name, t] of Object.entries(header)) {
    if (t.dtype !== "F32") throw new Error(`tensor ${name} is ${t.dtype}, not F32`);
    const [lo, hi] = t.data_offsets;
    const data = alloc((hi - lo) / 4);
    // a copy: the data may not start at a multiple of 4 bytes
    data.set(new Float32Array(buf.slice(8 + n + lo, 8 + n + hi)));
    tensors[name] = { shape: t.shape, data };
  }
  return tensors;
}

function transpose(a, rows, cols) {
  const t = alloc(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) t[c * rows + r] = a[r * cols + c];
  return t;
}

function joined(...arrays) {
  const out = alloc(arrays.reduce((n, a) => n + a.length, 0));
  let at = 0;
  for (const a of arrays) { out.set(a, at); at += a.length; }
  return out;
}

// ------------------------------------------------------------------ arithmetic

// The one hot loop, matrix times vector, runs as WebAssembly with 128-bit SIMD (four float32
// products at once) where the browser has it, on float32 arrays in one WebAssembly memory;
// plain JavaScript otherwise. The module is assembled here from its instructions: the
// function matvec(W, b, x, out, rows, cols) takes byte offsets into the memory (b = 0: none).
const WASM_MATVEC = (() => {
  const I32 = 0x7f, F32 = 0x7d, V128 = 0x7b;
  const get = (i) => [0x20, i], set = (i) => [0x21, i];
  const i32 = (v) => [0x41, ...sleb(v)];
  const add = 0x6a, and = 0x71, shl = 0x74, geU = 0x4f;
  const simd = (op) => [0xfd, ...uleb(op)];
  const mem = (align) => [align, 0]; // memarg: log2 alignment, offset 0
  const [W, B, X, OUT, ROWS, COLS, R, C, WP, ACC, S, COLS4] = [...Array(12).keys()];
  const at = (base, idx) => [...get(base), ...get(idx), ...i32(2), shl, add]; // base + 4 idx
  const lane = (k) => [...get(ACC), ...simd(31), k]; // f32x4.extract_lane k
  const body = [
    ...get(COLS), ...i32(-4), and, ...set(COLS4),
    ...get(W), ...set(WP),
    ...i32(0), ...set(R),
    0x02, 0x40, 0x03, 0x40, // block, loop: rows
    ...get(R), ...get(ROWS), geU, 0x0d, 1,
    0x43, 0, 0, 0, 0, ...simd(19), ...set(ACC), // acc = f32x4.splat(0)
    ...i32(0), ...set(C),
    0x02, 0x40, 0x03, 0x40, // four columns a step
    ...get(C), ...get(COLS4), geU, 0x0d, 1,
    ...get(ACC), ...at(WP, C), ...simd(0), ...mem(2), ...at(X, C), ...simd(0), ...mem(2),
    ...simd(230), ...simd(228), ...set(ACC), // acc += W[r, c:c+4] * x[c:c+4]
    ...get(C), ...i32(4), add, ...set(C),
    0x0c, 0, 0x0b, 0x0b,
    ...lane(0), ...lane(1), 0x92, ...lane(2), ...lane(3), 0x92, 0x92, ...set(S),
    0x02, 0x40, 0x03, 0x40, // the last cols % 4 columns
    ...get(C), ...get(COLS), geU, 0x0d, 1,
    ...get(S), ...at(WP, C), 0x2a, ...mem(2), ...at(X, C), 0x2a, ...mem(2), 0x94, 0x92, ...set(S),
    ...get(C), ...i32(1), add, ...set(C),
    0x0c, 0, 0x0b, 0x0b,
    ...get(B), 0x04, 0x40, // if b: s = b[r] + s
    ...at(B, R), 0x2a, ...mem(2), ...get(S), 0x92, ...set(S),
    0x0b,
    ...at(OUT, R), ...get(S), 0x38, ...mem(2), // out[r] = s
    ...get(WP), ...get(COLS), ...i32(2), shl, add, ...set(WP),
    ...get(R), ...i32(1), add, ...set(R),
    0x0c, 0, 0x0b, 0x0b,
    0x0b,
  ];
  const locals = [3, I32, 1, V128, 1, F32, 1, I32]; // r c wp; acc; s; cols4 (in 3 + 3 runs)
  const func = [4, ...locals, ...body];

  // matvec4: the same sums, four rows at a time (each x[c:c+4] loaded once for four rows,
  // four independent chains of additions); rows and cols multiples of 4
  const [R4, RB, CB, P] = [6, 7, 8, 9]; // row, row bytes, column byte offset, rows' pointers
  const [XV, A, S4] = [13, 14, 18]; // x[c:c+4], accumulators A..A+3, a row's sum
  const four = [0, 1, 2, 3];
  const body4 = [
    ...get(COLS), ...i32(2), shl, ...set(RB),
    ...get(W), ...set(P),
    ...i32(0), ...set(R4),
    0x02, 0x40, 0x03, 0x40, // rows, four at a time
    ...get(R4), ...get(ROWS), geU, 0x0d, 1,
    ...[1, 2, 3].flatMap((k) => [...get(P + k - 1), ...get(RB), add, ...set(P + k)]),
    ...four.flatMap((k) => [0x43, 0, 0, 0, 0, ...simd(19), ...set(A + k)]),
    ...i32(0), ...set(CB),
    0x02, 0x40, 0x03, 0x40,
    ...get(CB), ...get(RB), geU, 0x0d, 1,
    ...get(X), ...get(CB), add, ...simd(0), ...mem(2), ...set(XV),
    ...four.flatMap((k) => [
      ...get(A + k), ...get(P + k), ...get(CB), add, ...simd(0), ...mem(2), ...get(XV),
      ...simd(230), ...simd(228), ...set(A + k),
    ]),
    ...get(CB), ...i32(16), add, ...set(CB),
    0x0c, 0, 0x0b, 0x0b,
    ...four.flatMap((k) => [
      ...get(A + k), ...simd(31), 0, ...get(A + k), ...simd(31), 1, 0x92,
      ...get(A + k), ...simd(31), 2, ...get(A + k), ...simd(31), 3, 0x92, 0x92, ...set(S4),
      ...get(B), 0x04, 0x40,
      ...get(B), ...get(R4), ...i32(k), add, ...i32(2), shl, add, 0x2a, ...mem(2),
      ...get(S4), 0x92, ...set(S4),
      0x0b,
      ...get(OUT), ...get(R4), ...i32(k), add, ...i32(2), shl, add, ...get(S4), 0x38, ...mem(2),
    ]),
    ...get(P + 3), ...get(RB), add, ...set(P),
    ...get(R4), ...i32(4), add, ...set(R4),
    0x0c, 0, 0x0b, 0x0b,
    0x0b,
  ];
  const func4 = [3, 7, I32, 5, V128, 1, F32, ...body4]; // r rb cb p0-3; xv a0-3; s

  const section = (id, bytes) => [id, ...uleb(bytes.length), ...bytes];
  const name = (s) => [s.length, ...[...s].map((ch) => ch.charCodeAt(0))];
  return new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 1, 0, 0, 0,
    ...section(1, [1, 0x60, 6, I32, I32, I32, I32, I32, I32, 0]),
    ...section(2, [1, ...name("env"), ...name("mem"), 0x02, 0x00, 1]),
    ...section(3, [2, 0, 0]),
    ...section(7, [2, ...name("matvec"), 0x00, 0, ...name("matvec4"), 0x00, 1]),
    ...section(10, [2, ...uleb(func.length), ...func, ...uleb(func4.length), ...func4]),
  ]);
})();

function uleb(v) {
  const out = [];
  do { let b = v & 0x7f; v >>>= 7; if (v) b |= 0x80; out.push(b); } while (v);
  return out;
}

function sleb(v) {
  const out = [];
  for (;;) {
    const b = v & 0x7f;
    v >>= 7;
    if ((v === 0 && !(b & 0x40)) || (v === -1 && b & 0x40)) return [...out, b];
    out.push(b | 0x80);
  }
}

let heap = null, heapUsed = 16, wasmMatvec = null, wasmMatvec4 = null; // offset 0: "no bias"
// ?engine=js in the URL: plain JavaScript even where WebAssembly SIMD runs (for comparison)
const plainJs = new URLSearchParams(location.search).get("engine") === "js";

function makeHeap(bytes) {
  heap = null;
  heapUsed = 16;
  wasmMatvec = wasmMatvec4 = null;
  if (plainJs || typeof WebAssembly === "undefined" || !WebAssembly.validate(WASM_MATVEC)) return;
  try {
    const memory = new WebAssembly.Memory({ initial: Math.ceil(bytes / 65536) });
    const module = new WebAssembly.Module(WASM_MATVEC);
    ({ matvec: wasmMatvec, matvec4: wasmMatvec4 } =
      new WebAssembly.Instance(module, { env: { mem: memory } }).exports);
    heap = memory.buffer;
  } catch (err) { // e.g. no memory that large: plain JavaScript
    console.warn("WebAssembly unavailable, plain JavaScript:", err);
  }
}

function alloc(n) { // n float32 in the heap (16-byte aligned), or a plain array once it is full
  const bytes = (n * 4 + 15) & ~15;
  if (!heap || heapUsed + bytes > heap.byteLength) return new Float32Array(n);
  const a = new Float32Array(heap, heapUsed, n);
  heapUsed += bytes;
  return a;
}

const inHeap = (a) => a.buffer === heap;
const engine = () => (wasmMatvec ? "WebAssembly SIMD" : "JavaScript");

// out[r] = b[r] + sum_c W[r, c] x[c] for a row-major (rows, cols) W; b may be null
function matvec(W, b, x, rows, cols, out) {
  if (wasmMatvec && inHeap(W) && inHeap(x) && inHeap(out) && (!b || inHeap(b))) {
    const run = rows % 4 === 0 && cols % 4 === 0 ? wasmMatvec4 : wasmMatvec;
    run(W.byteOffset, b ? b.byteOffset : 0, x.byteOffset, out.byteOffset, rows, cols);
    return out;
  }
  for (let r = 0, o = 0; r < rows; r++, o += cols) {
    let s0 = 0, s1 = 0, s2 = 0, s3 = 0, c = 0;
    for (; c + 3 < cols; c += 4) {
      s0 += W[o + c] * x[c];
      s1 += W[o + c + 1] * x[c + 1];
      s2 += W[o + c + 2] * x[c + 2];
      s3 += W[o + c + 3] * x[c + 3];
    }
    for (; c < cols; c++) s0 += W[o + c] * x[c];
    out[r] = (b ? b[r] : 0) + (s0 + s1 + (s2 + s3));
  }
  return out;
}

const sigmoid = (v) => 1 / (1 + Math.exp(-v));

function logSoftmax(a) {
  let m = -Infinity;
  for (let i = 0; i < a.length; i++) if (a[i] > m) m = a[i];
  let s = 0;
  for (let i = 0; i < a.length; i++) s += Math.exp(a[i] - m);
  const lse = m + Math.log(s);
  for (let i = 0; i < a.length; i++) a[i] -= lse;
  return a;
}

// ------------------------------------------------------------------ models

function scratchModel(t) {
  const [V, H] = t["W_xh"].shape;
  const Wxh = t["W_xh"].data, bh = t["b_h"].data, bq = t["b_q"].data;
  const WhhT = transpose(t["W_hh"].data, H, H); // row j: column j of W_hh
  const WhqT = transpose(t["W_hq"].data, H, V);
  const pre = alloc(H), logits = alloc(V), h = alloc(H);
  return {
    vocabSize: V,
    init: () => [h.fill(0)],
    step(id, [h]) {
      matvec(WhhT, null, h, H, H, pre);
      for (let j = 0; j < H; j++) h[j] = Math.tanh(Wxh[id * H + j] + bh[j] + pre[j]);
      return matvec(WhqT, bq, h, V, H, logits);
    },
  };
}

function cell(kind, t, i) {
  const p = `rnn.${i}.`;
  const Wih = t[p + "weight_ih_l0"], Whh = t[p + "weight_hh_l0"];
  const bih = t[p + "bias_ih_l0"].data, bhh = t[p + "bias_hh_l0"].data;
  const [G, In] = Wih.shape;
  const H = Whh.shape[1];
  const gi = alloc(G), gh = alloc(G);
  const own = kind === "lstm" ? [alloc(H), alloc(H)] : [alloc(H)];
  const state = () => own.map((a) => a.fill(0)); // one generation at a time
  // step(x, [h] or [h, c]) updates the state in place; the new h is the layer's output
  const steps = {
    rnn(x, [h]) {
      matvec(Wih.data, bih, x, G, In, gi);
      matvec(Whh.data, bhh, h, G, H, gh);
      for (let j = 0; j < H; j++) h[j] = Math.tanh(gi[j] + gh[j]);
    },
    gru(x, [h]) { // gates r, z, n; n = tanh(W_in x + b_in + r (W_hn h + b_hn))
      matvec(Wih.data, bih, x, G, In, gi);
      matvec(Whh.data, bhh, h, G, H, gh);
      for (let j = 0; j < H; j++) {
        const r = sigmoid(gi[j] + gh[j]);
        const z = sigmoid(gi[H + j] + gh[H + j]);
        const n = Math.tanh(gi[2 * H + j] + Math.fround(r * gh[2 * H + j]));
        h[j] = (1 - z) * n + z * h[j];
      }
    },
    lstm(x, [h, c]) { // gates i, f, g, o
      matvec(Wih.data, bih, x, G, In, gi);
      matvec(Whh.data, bhh, h, G, H, gh);
      for (let j = 0; j < H; j++) {
        const ig = sigmoid(gi[j] + gh[j]);
        const fg = sigmoid(gi[H + j] + gh[H + j]);
        const gg = Math.tanh(gi[2 * H + j] + gh[2 * H + j]);
        const og = sigmoid(gi[3 * H + j] + gh[3 * H + j]);
        c[j] = fg * c[j] + ig * gg;
        h[j] = og * Math.tanh(c[j]);
      }
    },
  };
  return { H, In, state, step: steps[kind] };
}

function adaptiveIO(t) {
  // the vocabulary in clusters [bounds[k], bounds[k+1]) at widths dims[k] (pipeline/adaptive.py)
  const emb = [], proj = [], outEmb = [], outProj = [], bias = [];
  for (let k = 0; `io.emb.${k}` in t; k++) {
    emb.push(t[`io.emb.${k}`]);
    bias.push(t[`io.bias.${k}`].data);
    proj.push(k ? t[`io.proj.${k - 1}`] : null);
    outEmb.push(t[`io.out_emb.${k}`] || t[`io.emb.${k}`]); // tied: the input's matrices
    outProj.push(k ? t[`io.out_proj.${k - 1}`] || t[`io.proj.${k - 1}`] : null);
  }
  const bounds = [0];
  for (const e of emb) bounds.push(bounds[bounds.length - 1] + e.shape[0]);
  const d = emb[0].shape[1], n = emb.length, size0 = bounds[1];
  const cluster = t["io.cluster"].data, clusterBias = t["io.cluster_bias"].data;
  const headW = joined(outEmb[0].data, cluster);
  const headB = joined(bias[0], clusterBias);
  const head = alloc(size0 + n - 1);
  const tails = emb.map((e) => alloc(e.shape[0]));
  const zs = emb.map((e) => alloc(e.shape[1]));
  const V = bounds[n];
  const x = alloc(d), logp = alloc(V);
  return {
    vocabSize: V,
    d,
    embed(id) {
      let k = 0;
      while (id >= bounds[k + 1]) k++;
      const dk = emb[k].shape[1], row = (id - bounds[k]) * dk, E = emb[k].data;
      if (k === 0) {
        for (let i = 0; i < d; i++) x[i] = E[row + i];
      } else { // row @ proj[k-1], (dk) x (dk, d)
        const P = proj[k].data;
        for (let i = 0; i < d; i++) {
          let s = 0;
          for (let j = 0; j < dk; j++) s += E[row + j] * P[j * d + i];
          x[i] = s;
        }
      }
      return x;
    },
    logProb(h) {
      logSoftmax(matvec(headW, headB, h, size0 + n - 1, d, head));
      logp.set(head.subarray(0, size0));
      for (let k = 1; k < n; k++) {
        const dk = emb[k].shape[1], size = emb[k].shape[0];
        matvec(outProj[k].data, null, h, dk, d, zs[k]); // h @ proj^T
        logSoftmax(matvec(outEmb[k].data, bias[k], zs[k], size, dk, tails[k]));
        const lp = head[size0 + k - 1];
        for (let i = 0; i < size; i++) logp[bounds[k] + i] = lp + tails[k][i];
      }
      return logp;
    },
  };
}

function torchModel(kind, t) {
  const layers = [];
  for (let i = 0; `rnn.${i}.weight_ih_l0` in t; i++) layers.push(cell(kind, t, i));
  const H = layers[0].H;
  if ("io.cluster" in t) {
    const io = adaptiveIO(t);
    return {
      vocabSize: io.vocabSize,
      init: () => layers.map((l) => l.state()),
      step(id, state) {
        let x = io.embed(id);
        layers.forEach((l, i) => { l.step(x, state[i]); x = state[i][0]; });
        return io.logProb(x);
      },
    };
  }
  const E = t["embedding.weight"] || t["dense.weight"]; // tied: stored once, under either name
  const D = t["dense.weight"] || t["embedding.weight"];
  const [V, width] = E.shape;
  const b = t["dense.bias"].data, logits = alloc(V);
  return {
    vocabSize: V,
    init: () => layers.map((l) => l.state()),
    step(id, state) {
      let x = E.data.subarray(id * width, (id + 1) * width);
      layers.forEach((l, i) => { l.step(x, state[i]); x = state[i][0]; });
      return matvec(D.data, b, x, V, H, logits);
    },
  };
}

function buildModel(kind, tensors) {
  return kind === "rnn_scratch" ? scratchModel(tensors) : torchModel(kind, tensors);
}

// ------------------------------------------------------------------ generation

// Python's repr() of a string, so that messages read as `python -m pipeline generate` prints them
function pyRepr(s) {
  const quote = s.includes("'") && !s.includes('"') ? '"' : "'";
  const unprintable = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}\p{Zs}]/u;
  let out = quote;
  for (const ch of s) {
    const cp = ch.codePointAt(0);
    if (ch === quote || ch === "\\") out += "\\" + ch;
    else if (ch === "\n") out += "\\n";
    else if (ch === "\r") out += "\\r";
    else if (ch === "\t") out += "\\t";
    else if (ch !== " " && unprintable.test(ch)) {
      const hex = cp.toString(16);
      out += cp < 0x100 ? "\\x" + hex.padStart(2, "0")
           : cp < 0x10000 ? "\\u" + hex.padStart(4, "0") : "\\U" + hex.padStart(8, "0");
    } else out += ch;
  }
  return out + quote;
}

// pipeline.generate.check_prefix's message, or null when every character has an id
function prefixError(prefix, stoi, vocabSize) {
  if (!prefix) return "the prefix is empty: give at least one character";
  const missing = [...new Set([...prefix].filter((c) => !stoi.has(c) || c === UNK))];
  if (!missing.length) return null;
  return `prefix ${pyRepr(prefix)} has characters outside the vocabulary ` +
         `(${vocabSize} characters): ${missing.map(pyRepr).join(" ")}`;
}

function mulberry32(seed) { // a small seeded PRNG: the same seed gives the same sample
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function argmax(a) { // the first of equal maxima, as torch.argmax
  let best = 0;
  for (let i = 1; i < a.length; i++) if (a[i] > a[best]) best = i;
  return best;
}

function sample(logits, temperature, topK, random) {
  const z = Array.from(logits, (v) => v / temperature);
  if (topK > 0 && topK < z.length) { // keep logits >= the k-th largest (ties kept)
    const kth = [...z].sort((a, b) => b - a)[topK - 1];
    for (let i = 0; i < z.length; i++) if (z[i] < kth) z[i] = -Infinity;
  }
  const m = Math.max(...z);
  const p = z.map((v) => Math.exp(v - m));
  let u = random() * p.reduce((a, b) => a + b, 0);
  for (let i = 0; i < p.length; i++) if ((u -= p[i]) < 0) return i;
  return argmax(z);
}

// a yield to the event loop without setTimeout's 4 ms clamp: text appears, Stop is heard
const channel = new MessageChannel();
const waiting = [];
channel.port1.onmessage = () => waiting.shift()();
const yieldNow = () => new Promise((resolve) => { waiting.push(resolve); channel.port2.postMessage(0); });

// ------------------------------------------------------------------ the page

const $ = (id) => document.getElementById(id);
let app = null; // { model, vocab, stoi, meta }
let stopped = false;

function describe(meta, tensors) {
  const m = meta.model, c = meta.config || {}, data = c.data || {};
  const params = Object.values(tensors).reduce((n, t) => n + t.data.length, 0);
  const corpus = data.source === "text" || data.source === "hf" ? data.path
               : `the built-in corpus ${data.corpus}`;
  const bpc = meta.best_val_loss == null ? "no validation split held out"
            : `${(meta.best_val_loss / Math.LN2).toFixed(3)} bits/char on validation`;
  const layers = m.kind === "rnn_scratch" ? 1 : m.num_layers;
  const extras = [m.tie_weights && m.kind !== "rnn_scratch" ? "tied" : "",
                  (m.adaptive_cutoffs || []).length && m.kind !== "rnn_scratch"
                    ? `adaptive cutoffs ${JSON.stringify(m.adaptive_cutoffs)}` : ""]
                 .filter(Boolean).join(", ");
  return `${(c.run && c.run.name) || "model"}: ${m.kind}, ${layers} layer(s) of ` +
         `${m.hidden_size}${extras ? " (" + extras + ")" : ""}, ${params.toLocaleString("en")} ` +
         `parameters, ${meta.vocab_size} characters; trained on ${corpus}, ${meta.step} steps; ` +
         `${bpc}.`;
}

async function load() {
  const [cfgResp, wResp] = await Promise.all([fetch("config.json"), fetch("model.safetensors")]);
  if (!cfgResp.ok || !wResp.ok) throw new Error("config.json or model.safetensors is missing");
  const meta = await cfgResp.json();
  const tensors = readSafetensors(await wResp.arrayBuffer());
  const model = buildModel(meta.model.kind, tensors);
  if (model.vocabSize !== meta.vocab.length) {
    throw new Error(`model.safetensors has ${model.vocabSize} outputs, config.json ` +
                    `${meta.vocab.length} characters`);
  }
  $("model").textContent = describe(meta, tensors); // text: nothing in config.json runs
  // a few steps now, so that the browser has compiled the WebAssembly in its optimizing
  // tier (it starts with a quick baseline) before the first generation
  const state = model.init();
  for (let i = 0; i < 40; i++) model.step(i % model.vocabSize, state);
  document.title = `lyrics-rnn: ${(meta.config.run || {}).name || meta.model.kind}`;
  return { model, meta, vocab: meta.vocab, stoi: new Map(meta.vocab.map((c, i) => [c, i])) };
}

function settings() {
  const num = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
  const temperature = num("temperature") || 0;
  let seed = num("seed");
  if (temperature > 0 && seed === null) seed = Math.floor(Math.random() * 2 ** 31);
  return { prefix: $("prefix").value, length: Math.max(1, num("length") || 100),
           temperature, topK: num("top_k") || 0, seed };
}

function shareLink(s) {
  const q = new URLSearchParams({ prefix: s.prefix, length: String(s.length) });
  if (s.temperature > 0) {
    q.set("temperature", String(s.temperature));
    if (s.topK) q.set("top_k", String(s.topK));
    q.set("seed", String(s.seed));
  }
  return location.origin + location.pathname + "?" + q.toString();
}

function show(prefix, generated) {
  const out = $("out");
  out.textContent = "";
  const p = document.createElement("span");
  p.className = "prefix";
  p.textContent = prefix;
  out.append(p, generated);
}

async function generate() {
  const s = settings();
  const out = $("out"), status = $("status");
  status.className = "";
  $("share").textContent = "";
  const error = prefixError(s.prefix, app.stoi, app.vocab.length);
  if (error) {
    out.textContent = "";
    status.className = "error";
    status.textContent = "error: " + error;
    out.dataset.state = "error";
    return;
  }
  out.dataset.state = "running";
  $("go").disabled = true;
  $("stop").disabled = false;
  stopped = false;
  const random = mulberry32(s.seed || 0);
  const { model, vocab, stoi } = app;
  const t0 = performance.now();
  const state = model.init();
  let logits = null;
  for (const c of s.prefix) logits = model.step(stoi.get(c), state);
  let text = "", made = 0, lastShow = t0;
  while (made < s.length && !stopped) {
    const next = s.temperature > 0 ? sample(logits, s.temperature, s.topK, random) : argmax(logits);
    text += vocab[next];
    made++;
    if (made < s.length) logits = model.step(next, state);
    const now = performance.now();
    if (now - lastShow > 30) { // show what came so far; let Stop and typing in
      show(s.prefix, text);
      lastShow = now;
      await yieldNow();
    }
  }
  const seconds = (performance.now() - t0) / 1000;
  show(s.prefix, text);
  const rate = made / seconds;
  status.textContent = `${made} characters in ${seconds.toFixed(3)} s ` +
    `(${Math.round(rate)} characters/s), ` +
    (s.temperature > 0 ? `temperature ${s.temperature}, top-k ${s.topK || "all"}, seed ${s.seed}`
                       : "greedy") + `, ${engine()}` + (stopped ? ", stopped" : "");
  const link = document.createElement("a");
  link.href = shareLink(s);
  link.textContent = decodeURIComponent(link.href); // readable: 分开, not %E5%88%86
  $("share").append("link to this sample: ", link);
  window.lastRun = { text: s.prefix + text, generated: made, seconds, rate, engine: engine() };
  out.dataset.state = "done";
  $("go").disabled = false;
  $("stop").disabled = true;
}

async function main() {
  try {
    app = await load();
  } catch (err) {
    $("model").textContent = `error: could not load the model (${err.message}); serve this ` +
      "folder over HTTP, e.g. `python -m http.server -d FOLDER`";
    $("out").dataset.state = "error";
    return;
  }
  $("go").disabled = false;
  $("form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  $("stop").addEventListener("click", () => { stopped = true; });
  const q = new URLSearchParams(location.search);
  if (q.has("prefix")) { // a shared link: generate on load
    $("prefix").value = q.get("prefix");
    for (const key of ["length", "temperature", "top_k", "seed"]) {
      if (q.has(key)) $(key).value = q.get(key);
    }
    await generate();
  }
}

main();
