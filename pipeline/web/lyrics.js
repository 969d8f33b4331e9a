// lyrics-rnn in the browser: the exported folder's model.safetensors and config.json, run in
// plain JavaScript (no framework, nothing fetched but this folder's files).
//
// The models are pipeline/model.py's, inference only (dropout off), one character a step:
//   rnn_scratch  h = tanh(W_xh[x] + b_h + h W_hh), logits = h W_hq + b_q
//   rnn/gru/lstm an embedding (or the adaptive input), one torch cell per layer (nn.RNN,
//                nn.GRU, nn.LSTM gate orders), then a linear output (or the adaptive
//                softmax's log-probabilities); a tied output reads the embedding's matrix.
// Weights and every activation are float32 arrays like the model's; a dot product sums in
// float64 and is rounded once when stored, so greedy text matches PyTorch's unless two
// logits lie within float32 rounding of each other.
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
  const tensors = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    if (t.dtype !== "F32") throw new Error(`tensor ${name} is ${t.dtype}, not F32`);
    const [lo, hi] = t.data_offsets;
    // a copy: the data may not start at a multiple of 4 bytes
    tensors[name] = { shape: t.shape, data: new Float32Array(buf.slice(8 + n + lo, 8 + n + hi)) };
  }
  return tensors;
}

function transpose(a, rows, cols) {
  const t = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) t[c * rows + r] = a[r * cols + c];
  return t;
}

// ------------------------------------------------------------------ arithmetic

// out[r] = b[r] + sum_c W[r, c] x[c] for a row-major (rows, cols) W; b may be null
function matvec(W, b, x, rows, cols, out) {
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
  const pre = new Float32Array(H), logits = new Float32Array(V);
  return {
    vocabSize: V,
    init: () => [new Float32Array(H)],
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
  const gi = new Float32Array(G), gh = new Float32Array(G);
  const state = kind === "lstm" ? () => [new Float32Array(H), new Float32Array(H)]
                                : () => [new Float32Array(H)];
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
  const headW = new Float32Array([...outEmb[0].data, ...cluster]);
  const headB = new Float32Array([...bias[0], ...clusterBias]);
  const head = new Float32Array(size0 + n - 1);
  const tails = emb.map((e) => new Float32Array(e.shape[0]));
  const zs = emb.map((e) => new Float32Array(e.shape[1]));
  const V = bounds[n];
  const x = new Float32Array(d), logp = new Float32Array(V);
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
  const b = t["dense.bias"].data, logits = new Float32Array(V);
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
  return `<b>${(c.run && c.run.name) || "model"}</b>: ${m.kind}, ${layers} layer(s) of ` +
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
  $("model").innerHTML = describe(meta, tensors);
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
                       : "greedy") + (stopped ? ", stopped" : "");
  const link = document.createElement("a");
  link.href = link.textContent = shareLink(s);
  $("share").append("link to this sample: ", link);
  window.lastRun = { text: s.prefix + text, generated: made, seconds, rate };
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
