// pipeline.py + decoding.py + backends/onnxruntime.py in C++: crop -> vision -> prefix prefill
// (with the rounds' common head) -> all (crop, keypoint) rows in one batch on the cascade graph
// decoder_shared.onnx (prefix KV one copy per crop; decoder.onnx with per-row prefix copies for
// engines without it) -> constrained jump-forward decoding -> official scores -> image pixels.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>

#include "core.hpp"

namespace locllm {
namespace {

constexpr size_t kCropsPerChunk = 16;  // crops per vision/decoding batch: bounds memory per call

std::vector<std::string> layer_names(const char *a, const char *b, int layers) {
  std::vector<std::string> out;
  for (int i = 0; i < layers; ++i) {
    out.push_back(std::string(a) + std::to_string(i));
    out.push_back(std::string(b) + std::to_string(i));
  }
  return out;
}

std::vector<const char *> c_names(const std::vector<std::string> &names) {
  std::vector<const char *> out;
  for (const auto &n : names) out.push_back(n.c_str());
  return out;
}

// embeddings.npy: a C-ordered little-endian float32 [V, H] numpy array
std::vector<float> read_embeddings(const std::string &path, int vocab, int hidden) {
  std::ifstream in(path, std::ios::binary);
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    fail(LOCLLM_ENGINE_ERROR, path + ": not a numpy embedding table (no .npy header)");
  size_t header_len = 0;
  unsigned char len[4] = {};
  const int width = magic[6] == 1 ? 2 : 4;
  if (!in.read(reinterpret_cast<char *>(len), width)) fail(LOCLLM_ENGINE_ERROR, path + ": truncated .npy header");
  for (int i = width - 1; i >= 0; --i) header_len = header_len << 8 | len[i];
  if (header_len > 65536) fail(LOCLLM_ENGINE_ERROR, path + ": implausible .npy header length");
  std::string header(header_len, '\0');
  if (!in.read(header.data(), static_cast<std::streamsize>(header_len)))
    fail(LOCLLM_ENGINE_ERROR, path + ": truncated .npy header");
  std::string compact;
  for (char c : header)
    if (c != ' ') compact += c;
  const std::string shape = "'shape':(" + std::to_string(vocab) + "," + std::to_string(hidden) + ")";
  if (compact.find("'descr':'<f4'") == std::string::npos || compact.find("'fortran_order':False") == std::string::npos ||
      compact.find(shape) == std::string::npos)
    fail(LOCLLM_ENGINE_ERROR, path + ": embedding table " + header + " is not the manifest model's float32 (" +
                                  std::to_string(vocab) + ", " + std::to_string(hidden) + ")");
  std::vector<float> table(static_cast<size_t>(vocab) * hidden);
  if (!in.read(reinterpret_cast<char *>(table.data()), static_cast<std::streamsize>(table.size() * sizeof(float))))
    fail(LOCLLM_ENGINE_ERROR, path + ": the embedding table is truncated");
  return table;
}

double max_softmax(const float *x, size_t n) {  // protocol.max_softmax, in float64
  double m = x[0];
  for (size_t i = 1; i < n; ++i) m = std::max(m, static_cast<double>(x[i]));
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += std::exp(static_cast<double>(x[i]) - m);
  return 1.0 / s;
}

}  // namespace

struct Engine::Impl {
  Ort::Env env{ORT_LOGGING_LEVEL_ERROR, "locllm"};
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::unique_ptr<Ort::Session> vision, decoder, shared;
  std::vector<float> embeddings;
  std::unique_ptr<PromptTokenizer> tokenizer;
  std::vector<std::string> step_in, step_out, shared_in;
  int layers = 0, kv_heads = 0, head_dim = 0, hidden = 0, vocab = 0;
  float dummy = 0;  // the data pointer of empty tensors

  Ort::Value tensor(std::vector<float> &data, const std::vector<int64_t> &shape) {
    return Ort::Value::CreateTensor<float>(cpu, data.empty() ? &dummy : data.data(), data.size(), shape.data(),
                                           shape.size());
  }
  Ort::Value tensor(std::vector<int64_t> &data, const std::vector<int64_t> &shape) {
    return Ort::Value::CreateTensor<int64_t>(cpu, data.data(), data.size(), shape.data(), shape.size());
  }
  Ort::Value empty_kv(int64_t batch) {
    const std::vector<int64_t> shape{batch, kv_heads, 0, head_dim};
    return Ort::Value::CreateTensor<float>(cpu, &dummy, 0, shape.data(), shape.size());
  }
  void embed(const std::vector<int64_t> &ids, float *out) const {
    for (size_t i = 0; i < ids.size(); ++i)
      std::memcpy(out + i * hidden, &embeddings[static_cast<size_t>(ids[i]) * hidden], hidden * sizeof(float));
  }
};

namespace {

void check_io(Ort::Session &s, const std::string &name, const std::vector<std::string> &inputs,
              const std::vector<std::string> &outputs) {
  Ort::AllocatorWithDefaultOptions alloc;
  std::vector<std::string> got_in, got_out;
  for (size_t i = 0; i < s.GetInputCount(); ++i) got_in.push_back(s.GetInputNameAllocated(i, alloc).get());
  for (size_t i = 0; i < s.GetOutputCount(); ++i) got_out.push_back(s.GetOutputNameAllocated(i, alloc).get());
  const std::set<std::string> have(got_out.begin(), got_out.end());
  bool ok = got_in == inputs;
  for (const auto &o : outputs) ok = ok && have.count(o);
  if (!ok)
    fail(LOCLLM_ENGINE_ERROR, name + ": the graph's inputs/outputs are not the engine contract's (" + inputs[0] +
                                  ", ...; a graph of another model or another role?)");
}

}  // namespace

Engine::Engine(const std::string &engine_dir, bool verify, int threads) {
  manifest = Manifest::read(engine_dir);
  manifest.verify_files(verify);
  Manifest &m = manifest;
  const OrtApi *api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (!api)
    fail(LOCLLM_BACKEND_UNAVAILABLE, std::string("the ONNX Runtime library (") + OrtGetApiBase()->GetVersionString() +
                                         ") does not serve ORT API " + std::to_string(ORT_API_VERSION) +
                                         ": it needs onnxruntime >= 1.29");
  Ort::InitApi(api);
  impl_ = std::make_unique<Impl>();  // after InitApi: it holds ONNX Runtime objects
  // the tokenizer must give the ids the engine was built with
  try {
    impl_->tokenizer = std::make_unique<PromptTokenizer>(m.path(m.tokenizer_dir + "/tokenizer.model").substr(
        0, m.path(m.tokenizer_dir + "/tokenizer.model").size() - std::strlen("/tokenizer.model")));
  } catch (const Error &e) {
    fail(LOCLLM_ENGINE_ERROR, engine_dir + ": the engine's tokenizer cannot be read: " + e.what());
  }
  const PromptTokenizer &t = *impl_->tokenizer;
  std::string changed;
  auto differ = [&](const char *key, long long want, long long got) {
    if (want != got) changed += std::string(changed.empty() ? "" : ", ") + key + " " + std::to_string(want) + " -> " +
                                std::to_string(got);
  };
  differ("legacy", m.legacy, t.legacy);
  differ("bos_id", m.bos_id, t.bos_id);
  differ("eos_id", m.eos_id, t.eos_id);
  differ("pad_id", m.pad_id, t.pad_id);
  differ("im_patch_id", m.im_patch_id, t.im_patch_id);
  if (!changed.empty())
    fail(LOCLLM_ENGINE_ERROR, engine_dir + ": tokenizer settings " + changed +
                                  " differ from the manifest's: they change the prompt ids, so the engine is refused");
  if (t.prefix_ids(m.num_patches) != m.prefix_ids || !(build_grammar(t, m.coord_dims) == m.grammar))
    fail(LOCLLM_ENGINE_ERROR, engine_dir + ": tokenizer ids differ from the manifest's (tokenizer files or runtime "
                                           "changed)");
  library = DescriptionLibrary::load(m.path("descriptions.yaml"));

  Impl &r = *impl_;
  r.layers = m.num_layers;
  r.kv_heads = m.num_kv_heads;
  r.head_dim = m.head_dim;
  r.hidden = m.hidden_size;
  r.vocab = m.vocab_size;
  if (threads <= 0) {
    const char *env = std::getenv("LOCLLM_THREADS");
    threads = env ? std::atoi(env) : 0;
  }
  Ort::SessionOptions opts;
  opts.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  if (threads > 0) opts.SetIntraOpNumThreads(threads);
  auto session = [&](const std::string &name) {
    const std::string path = m.path(name);
    try {
      return std::make_unique<Ort::Session>(r.env, path.c_str(), opts);
    } catch (const Ort::Exception &e) {
      std::string what = e.what();
      fail(LOCLLM_ENGINE_ERROR, path + ": ONNX Runtime cannot load this graph: " + what.substr(0, what.find('\n')));
    }
  };
  r.step_in = {"inputs_embeds", "attention_mask", "position_ids", "logits_index"};
  r.shared_in = r.step_in;
  const auto past = layer_names("past_key_", "past_value_", r.layers);
  const auto prefix = layer_names("prefix_key_", "prefix_value_", r.layers);
  r.shared_in.insert(r.shared_in.end(), prefix.begin(), prefix.end());
  r.shared_in.insert(r.shared_in.end(), past.begin(), past.end());
  r.step_in.insert(r.step_in.end(), past.begin(), past.end());
  r.step_out = {"logits"};
  const auto present = layer_names("present_key_", "present_value_", r.layers);
  r.step_out.insert(r.step_out.end(), present.begin(), present.end());
  r.vision = session(m.vision);
  check_io(*r.vision, m.vision, {"pixel_values"}, {"image_tokens"});
  const auto shape = r.vision->GetInputTypeInfo(0).GetTensorTypeAndShapeInfo().GetShape();
  if (shape.size() != 4 || shape[1] != 3 || shape[2] != m.image_size || shape[3] != m.image_size)
    fail(LOCLLM_ENGINE_ERROR, m.vision + ": input pixel_values is not [N, 3, " + std::to_string(m.image_size) + ", " +
                                  std::to_string(m.image_size) + "], the manifest's crop");
  r.decoder = session(m.decoder);
  check_io(*r.decoder, m.decoder, r.step_in, r.step_out);
  if (!m.decoder_shared.empty()) {
    r.shared = session(m.decoder_shared);
    check_io(*r.shared, m.decoder_shared, r.shared_in, r.step_out);
  }
  r.embeddings = read_embeddings(m.path(m.embeddings), m.vocab_size, m.hidden_size);
}

Engine::~Engine() = default;

std::vector<PersonAnswers> Engine::locate(const uint8_t *rgb, int width, int height, size_t stride,
                                          const std::vector<std::array<double, 4>> &boxes,
                                          const std::vector<KeypointRequest> &requests) {
  Impl &r = *impl_;
  const Manifest &m = manifest;
  const Grammar &g = m.grammar;
  const int size = m.image_size;
  // every input checked before any model work
  std::vector<CropGeometry> geoms;
  for (size_t i = 0; i < boxes.size(); ++i) geoms.push_back(crop_geometry(boxes[i].data(), width, height, size, i));
  std::vector<std::vector<int64_t>> suffix;
  const int answer_tokens = std::max<int>(static_cast<int>(g.slots.size()) + 1, g.dims == 2 ? 13 : 22);
  for (const auto &req : requests) {
    suffix.push_back(r.tokenizer->round_ids(req.name, req.description));
    const size_t prompt = m.prefix_ids.size() + suffix.back().size();
    if (m.max_position_embeddings && prompt + answer_tokens > static_cast<size_t>(m.max_position_embeddings))
      fail(LOCLLM_PROTOCOL_ERROR, "keypoint '" + req.name + "': its prompt is " + std::to_string(prompt) +
                                      " tokens + " + std::to_string(answer_tokens) + " answer tokens, past the model's "
                                      "context of " + std::to_string(m.max_position_embeddings) +
                                      " positions: shorten the description");
  }
  // split_common_head: the tokens every round starts with join the prefix
  size_t head = 0;
  {
    size_t limit = suffix[0].size() - 1;
    for (const auto &s : suffix) limit = std::min(limit, s.size() - 1);
    while (head < limit && std::all_of(suffix.begin(), suffix.end(), [&](const auto &s) { return s[head] == suffix[0][head]; }))
      ++head;
  }
  std::vector<int64_t> prefix_ids = m.prefix_ids;
  prefix_ids.insert(prefix_ids.end(), suffix[0].begin(), suffix[0].begin() + static_cast<long>(head));
  const int64_t L = static_cast<int64_t>(prefix_ids.size());
  const size_t k = requests.size();
  const int H = r.hidden;

  std::vector<PersonAnswers> out;
  for (size_t start = 0; start < geoms.size(); start += kCropsPerChunk) {
    const size_t n = std::min(kCropsPerChunk, geoms.size() - start);
    // crops -> vision
    const size_t plane = static_cast<size_t>(size) * size;
    std::vector<float> pixels(n * 3 * plane);
    std::vector<uint8_t> crop(plane * 3);
    for (size_t i = 0; i < n; ++i) {
      warp_affine(rgb, width, height, stride, geoms[start + i].forward, size, crop.data());
      normalize(crop.data(), size, m.norm_mean, m.norm_std, &pixels[i * 3 * plane]);
    }
    std::vector<int64_t> pshape{static_cast<int64_t>(n), 3, size, size};
    Ort::Value px = r.tensor(pixels, pshape);
    const char *vin[] = {"pixel_values"}, *vout[] = {"image_tokens"};
    auto tokens = r.vision->Run(Ort::RunOptions{nullptr}, vin, &px, 1, vout, 1);
    const float *image_tokens = tokens[0].GetTensorData<float>();
    const auto tshape = tokens[0].GetTensorTypeAndShapeInfo().GetShape();
    const int64_t patches = std::count(prefix_ids.begin(), prefix_ids.end(), m.im_patch_id);
    if (tshape.size() != 3 || tshape[1] != patches || tshape[2] != H)
      fail(LOCLLM_ENGINE_ERROR, m.vision + ": image tokens do not fit the prefix's <im_patch> count / hidden size");

    // prefix prefill on decoder.onnx: image tokens at <im_patch>
    std::vector<float> embeds(n * L * H);
    for (size_t i = 0; i < n; ++i) {
      int64_t p = 0;
      for (int64_t t = 0; t < L; ++t) {
        float *dst = &embeds[(i * L + t) * H];
        if (prefix_ids[t] == m.im_patch_id)
          std::memcpy(dst, image_tokens + (i * patches + p++) * H, H * sizeof(float));
        else
          r.embed({prefix_ids[t]}, dst);
      }
    }
    std::vector<int64_t> mask(n * L, 1), pos(n * L), last(n, L - 1);
    for (size_t i = 0; i < n; ++i)
      for (int64_t t = 0; t < L; ++t) pos[i * L + t] = t;
    std::vector<Ort::Value> feeds;
    feeds.push_back(r.tensor(embeds, {static_cast<int64_t>(n), L, H}));
    feeds.push_back(r.tensor(mask, {static_cast<int64_t>(n), L}));
    feeds.push_back(r.tensor(pos, {static_cast<int64_t>(n), L}));
    feeds.push_back(r.tensor(last, {static_cast<int64_t>(n), 1}));
    for (int i = 0; i < 2 * r.layers; ++i) feeds.push_back(r.empty_kv(static_cast<int64_t>(n)));
    auto in_names = c_names(r.step_in), out_names = c_names(r.step_out);
    auto prefill = r.decoder->Run(Ort::RunOptions{nullptr}, in_names.data(), feeds.data(), feeds.size(),
                                  out_names.data(), out_names.size());
    std::vector<Ort::Value> prefix_kv;
    for (size_t i = 1; i < prefill.size(); ++i) prefix_kv.push_back(std::move(prefill[i]));

    // rows: crop by crop, k each
    const size_t rows = n * k;
    const bool cascade = r.shared != nullptr;
    std::vector<Ort::Value> cache;
    std::vector<std::vector<float>> copied;  // the copy path's per-row prefix KV
    std::vector<int64_t> row_mask;           // [rows, mask_len]
    int64_t mask_len = 0;
    if (cascade) {
      for (int i = 0; i < 2 * r.layers; ++i) cache.push_back(r.empty_kv(static_cast<int64_t>(rows)));
    } else {
      const size_t per_crop = static_cast<size_t>(r.kv_heads) * L * r.head_dim;
      for (auto &kv : prefix_kv) {
        const float *src = kv.GetTensorData<float>();
        copied.emplace_back(rows * per_crop);
        for (size_t row = 0; row < rows; ++row)
          std::memcpy(&copied.back()[row * per_crop], src + (row / k) * per_crop, per_crop * sizeof(float));
        cache.push_back(r.tensor(copied.back(), {static_cast<int64_t>(rows), r.kv_heads, L, r.head_dim}));
      }
      row_mask.assign(rows * L, 1);
      mask_len = L;
    }
    std::vector<int64_t> next_pos(rows, L);

    // one pass: each row's feed right-padded; logits at want[row] (indices into its feed)
    auto run = [&](const std::vector<std::vector<int64_t>> &feed, const std::vector<std::vector<int64_t>> &want) {
      size_t t = 0;
      for (const auto &f : feed) t = std::max(t, f.size());
      const size_t kw = want[0].size();
      std::vector<int64_t> ids(rows * t, 0), step_pos(rows * t), index(rows * kw);
      std::vector<int64_t> new_mask(rows * (mask_len + t), 0);
      for (size_t row = 0; row < rows; ++row) {
        std::copy(feed[row].begin(), feed[row].end(), ids.begin() + static_cast<long>(row * t));
        std::copy(row_mask.begin() + static_cast<long>(row * mask_len),
                  row_mask.begin() + static_cast<long>((row + 1) * mask_len),
                  new_mask.begin() + static_cast<long>(row * (mask_len + t)));
        for (size_t j = 0; j < feed[row].size(); ++j) new_mask[row * (mask_len + t) + mask_len + j] = 1;
        for (size_t j = 0; j < t; ++j) step_pos[row * t + j] = next_pos[row] + static_cast<int64_t>(j);
        std::copy(want[row].begin(), want[row].end(), index.begin() + static_cast<long>(row * kw));
      }
      row_mask = std::move(new_mask);
      mask_len += static_cast<int64_t>(t);
      std::vector<float> emb(rows * t * H);
      r.embed(ids, emb.data());
      const int64_t R = static_cast<int64_t>(rows), T = static_cast<int64_t>(t);
      std::vector<Ort::Value> in;
      in.push_back(r.tensor(emb, {R, T, H}));
      in.push_back(r.tensor(row_mask, {R, mask_len}));
      in.push_back(r.tensor(step_pos, {R, T}));
      in.push_back(r.tensor(index, {R, static_cast<int64_t>(kw)}));
      if (cascade)
        for (auto &kv : prefix_kv) in.push_back(Ort::Value(static_cast<OrtValue *>(kv)));
      for (auto &kv : cache) in.push_back(std::move(kv));
      Ort::Session &s = cascade ? *r.shared : *r.decoder;
      auto names = c_names(cascade ? r.shared_in : r.step_in);
      auto result = s.Run(Ort::RunOptions{nullptr}, names.data(), in.data(), in.size(), out_names.data(),
                          out_names.size());
      if (cascade)  // the prefix KV values are borrowed, not owned
        for (size_t i = 4; i < 4 + prefix_kv.size(); ++i) in[i].release();
      cache.clear();
      for (size_t i = 1; i < result.size(); ++i) cache.push_back(std::move(result[i]));
      for (size_t row = 0; row < rows; ++row) next_pos[row] += static_cast<int64_t>(feed[row].size());
      copied.clear();  // the first pass has read the per-row prefix copies
      return std::move(result[0]);
    };

    // constrained_decode: forced tokens ride along (jump-forward); a pass only where a digit is free
    std::set<int> needed;
    std::vector<int> free_pos;
    for (size_t j = 0; j < g.slots.size(); ++j)
      if (g.slots[j] == Grammar::kFree) {
        needed.insert(static_cast<int>(j));
        free_pos.push_back(static_cast<int>(j));
      }
    for (const auto &[a, b] : g.number_spans)
      for (int p = a; p < b; ++p) needed.insert(p);
    const int last_needed = *needed.rbegin();
    std::vector<std::vector<double>> conf(rows, std::vector<double>(g.slots.size(), std::nan("")));
    std::vector<std::vector<int>> digits(rows);
    std::vector<std::vector<int64_t>> feed;
    for (size_t row = 0; row < rows; ++row) {
      const auto &s = suffix[row % k];
      feed.emplace_back(s.begin() + static_cast<long>(head), s.end());
    }
    std::vector<std::pair<int, int>> wanted;  // (answer position, offset from the end of the feed)
    for (int j = 0; j < static_cast<int>(g.slots.size()) && j <= last_needed; ++j) {
      const int64_t slot = g.slots[j];
      if (needed.count(j)) wanted.emplace_back(j, 0);
      if (slot == Grammar::kFree || j == last_needed) {
        std::vector<std::vector<int64_t>> want(rows);
        for (size_t row = 0; row < rows; ++row)
          for (const auto &[p, back] : wanted) want[row].push_back(static_cast<int64_t>(feed[row].size()) - 1 - back);
        Ort::Value logits = run(feed, want);
        const float *lg = logits.GetTensorData<float>();
        const size_t kw = wanted.size(), V = static_cast<size_t>(r.vocab);
        if (logits.GetTensorTypeAndShapeInfo().GetElementCount() != rows * kw * V)
          fail(LOCLLM_ENGINE_ERROR, "the decoder's logits are not [rows, positions, vocab_size]");
        for (size_t row = 0; row < rows; ++row) {
          for (size_t q = 0; q < kw; ++q) conf[row][wanted[q].first] = max_softmax(lg + (row * kw + q) * V, V);
          if (slot == Grammar::kFree) {  // argmax over the ten digit tokens (the first on ties)
            const float *last_logits = lg + (row * kw + kw - 1) * V;
            int best = 0;
            for (int d = 1; d < 10; ++d)
              if (last_logits[g.digit_ids[d]] > last_logits[g.digit_ids[best]]) best = d;
            digits[row].push_back(best);
            feed[row] = {g.digit_ids[best]};
          } else {
            feed[row] = {slot};
          }
        }
        wanted.clear();
      } else {
        for (auto &f : feed) f.push_back(slot);
        for (auto &w : wanted) ++w.second;
      }
    }
    // answers -> crop coordinates -> image pixels
    for (size_t i = 0; i < n; ++i) {
      PersonAnswers person;
      person.box = boxes[start + i];
      const auto &inv = geoms[start + i].inverse;
      for (size_t j = 0; j < k; ++j) {
        const size_t row = i * k + j;
        std::vector<int64_t> ids;
        size_t next_digit = 0;
        for (int64_t s : g.slots) ids.push_back(s == Grammar::kFree ? g.digit_ids[digits[row][next_digit++]] : s);
        ids.push_back(g.eos_id);
        // official scores drop the last generated step
        const std::vector<double> step_conf(conf[row].begin(), conf[row].end() - 1);
        const ParsedAnswer a = parse_answer(r.tokenizer->decode(ids), step_conf, g.dims);
        const double u = a.values[0] * size, v = a.values[1] * size;
        person.values.push_back({u * inv[0] + v * inv[1] + inv[2], u * inv[3] + v * inv[4] + inv[5],
                                 g.dims == 3 ? a.values[2] : std::nan("")});
        person.scores.push_back(a.score());
        person.texts.push_back(a.text);
      }
      out.push_back(std::move(person));
    }
  }
  return out;
}

}  // namespace locllm
