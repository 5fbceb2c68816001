// protocol.py in C++: the prompt's token ids (transformers 4.31's slow LlamaTokenizer, legacy
// handling included), the answer grammar derived from the tokenizer, and the official parse.
// The texts below are protocol.py's; the engine's manifest holds the prefix ids and the grammar
// they give, and Engine refuses a tokenizer whose ids differ from those.
#include <sentencepiece_processor.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core.hpp"

namespace locllm {
namespace {

const std::string kImagePatch = "<im_patch>";
const std::string kEosText = "</s>";
const std::string kImagePrefix = "Image: ";
const char *const kControlTexts[] = {"<im_patch>", "</s>", "<s>", "<unk>"};

std::string round_text(const std::string &name, const std::string &description) {
  return "Keypoint: " + description + "\nQuestion: Where is the " + name +
         " of this person in this image? Please provide its coordinates.\nAnswer:";
}

// Python's str.isspace for the characters the protocol's own texts put next to <im_patch>.
bool is_space(char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= '\x1c' && c <= '\x1f'); }

std::string rstrip(const std::string &s) {
  size_t n = s.size();
  while (n && is_space(s[n - 1])) --n;
  return s.substr(0, n);
}

std::string lstrip(const std::string &s) {
  size_t i = 0;
  while (i < s.size() && is_space(s[i])) ++i;
  return s.substr(i);
}

nlohmann::json json_object(const std::string &path) {
  std::ifstream f(path);
  if (!f) return nlohmann::json::object();
  try {
    nlohmann::json j = nlohmann::json::parse(f);
    if (!j.is_object()) fail(LOCLLM_ENGINE_ERROR, path + ": a tokenizer file must hold a JSON object");
    return j;
  } catch (const nlohmann::json::exception &e) {
    fail(LOCLLM_ENGINE_ERROR, path + ": malformed JSON (" + e.what() + ")");
  }
}

std::vector<int64_t> to64(const std::vector<int> &v) { return {v.begin(), v.end()}; }

}  // namespace

void check_user_text(const std::string &text, const std::string &what) {
  std::string found;
  for (const char *t : kControlTexts)
    if (text.find(t) != std::string::npos) found += (found.empty() ? "" : ", ") + std::string(t);
  if (!found.empty())
    fail(LOCLLM_PROTOCOL_ERROR, what + " contains " + found +
                                    ": control/image tokens of the prompt protocol (<im_patch>, </s>, <s>, <unk>) "
                                    "cannot appear in keypoint names or descriptions");
}

struct PromptTokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  std::vector<int64_t> unk_prefix;
  int vocab = 0;
  std::vector<int64_t> encode(const std::string &text) const {
    std::vector<int> ids;
    const auto status = sp.Encode(text, &ids);
    if (!status.ok()) fail(LOCLLM_ENGINE_ERROR, "SentencePiece cannot encode a prompt: " + status.ToString());
    return to64(ids);
  }
};

PromptTokenizer::PromptTokenizer(const std::string &dir) : impl_(std::make_unique<Impl>()) {
  const std::string model = dir + "/tokenizer.model";
  nlohmann::json config = json_object(dir + "/tokenizer_config.json");
  nlohmann::json added = json_object(dir + "/added_tokens.json");
  if (config.contains("added_tokens_decoder") && config["added_tokens_decoder"].is_object())
    for (const auto &[idx, tok] : config["added_tokens_decoder"].items()) {
      const std::string content = tok.is_object() && tok.contains("content") && tok["content"].is_string()
                                      ? tok["content"].get<std::string>()
                                      : tok.dump();
      try {
        if (!added.contains(content)) added[content] = std::stoll(idx);
      } catch (const std::exception &) {
        fail(LOCLLM_ENGINE_ERROR, dir + ": malformed added tokens (id " + idx + ")");
      }
    }
  if (!added.contains(kImagePatch) || !added[kImagePatch].is_number_integer())
    fail(LOCLLM_ENGINE_ERROR, dir + ": the tokenizer has no '<im_patch>' token (expected in added_tokens.json or "
                                    "tokenizer_config.json added_tokens_decoder)");
  const auto status = impl_->sp.Load(model);
  if (!status.ok()) fail(LOCLLM_ENGINE_ERROR, model + ": not a SentencePiece model (" + status.ToString() + ")");
  // transformers treats a missing or null flag as legacy
  legacy = !config.contains("legacy") || config["legacy"].is_null() || config["legacy"].get<bool>();
  add_bos = !config.contains("add_bos_token") || !config["add_bos_token"].is_boolean() ||
            config["add_bos_token"].get<bool>();
  bos_id = impl_->sp.bos_id();
  eos_id = impl_->sp.eos_id();
  pad_id = impl_->sp.pad_id() >= 0 ? impl_->sp.pad_id() : impl_->sp.unk_id();
  im_patch_id = added[kImagePatch].get<int64_t>();
  impl_->vocab = impl_->sp.GetPieceSize();
  // ids of "<unk>" text encoded alone: transformers' trick for a prefix-free encoding
  impl_->unk_prefix = impl_->encode("<unk>");
}

PromptTokenizer::~PromptTokenizer() = default;

std::vector<int64_t> PromptTokenizer::encode_chunk(const std::string &chunk, bool opens_text) const {
  if (chunk.empty()) return {};
  if (legacy || opens_text) return impl_->encode(chunk);
  // continuation: encode "<unk>" + chunk and drop the ids of "<unk>" (no "▁" prefix)
  std::vector<int64_t> ids = impl_->encode("<unk>" + chunk);
  const auto &p = impl_->unk_prefix;
  if (ids.size() < p.size() || !std::equal(p.begin(), p.end(), ids.begin()))
    fail(LOCLLM_ENGINE_ERROR, "the tokenizer merges '<unk>' with the following text");
  return {ids.begin() + static_cast<long>(p.size()), ids.end()};
}

std::vector<int64_t> PromptTokenizer::encode(const std::string &text, bool with_bos) const {
  // split on the added tokens, keeping them
  std::vector<std::string> pieces;
  size_t start = 0;
  while (true) {
    const size_t a = text.find(kImagePatch, start), b = text.find(kEosText, start);
    const size_t at = std::min(a, b);
    if (at == std::string::npos) break;
    const std::string &tok = at == a ? kImagePatch : kEosText;
    pieces.push_back(text.substr(start, at - start));
    pieces.push_back(tok);
    start = at + tok.size();
  }
  pieces.push_back(text.substr(start));
  for (size_t i = 0; i < pieces.size(); ++i)  // strip whitespace next to <im_patch> (4.31 default)
    if (pieces[i] == kImagePatch && (i % 2 == 1)) {
      pieces[i - 1] = rstrip(pieces[i - 1]);
      if (i + 1 < pieces.size()) pieces[i + 1] = lstrip(pieces[i + 1]);
    }
  std::vector<int64_t> ids;
  if (with_bos) ids.push_back(bos_id);
  for (size_t i = 0; i < pieces.size(); ++i) {
    if (i % 2 == 1 && pieces[i] == kImagePatch) {
      ids.push_back(im_patch_id);
    } else if (i % 2 == 1) {
      ids.push_back(eos_id);
    } else {  // only the chunk that opens the text carries the "▁" prefix (non-legacy)
      const auto chunk = encode_chunk(pieces[i], i == 0);
      ids.insert(ids.end(), chunk.begin(), chunk.end());
    }
  }
  return ids;
}

std::vector<int64_t> PromptTokenizer::prefix_ids(int num_patches) const {
  std::string text = kImagePrefix;
  for (int i = 0; i < num_patches; ++i) text += kImagePatch;
  return encode(text, add_bos);
}

std::vector<int64_t> PromptTokenizer::round_ids_with_answer(const std::string &name, const std::string &description,
                                                            const std::string &answer) const {
  check_user_text(name, "keypoint name '" + name + "'");
  check_user_text(description, "the description of '" + name + "'");
  std::string text = round_text(name, description);
  if (!answer.empty()) text += " " + answer + kEosText;
  // encoded as the continuation it is after an added token; "\n" after <im_patch> is stripped
  std::vector<int64_t> ids = encode(kImagePatch + "\n" + text, false);
  return {ids.begin() + 1, ids.end()};
}

std::vector<int64_t> PromptTokenizer::round_ids(const std::string &name, const std::string &description) const {
  return round_ids_with_answer(name, description, "");
}

std::vector<int64_t> PromptTokenizer::digit_ids() const {
  std::vector<int64_t> ids;
  const int64_t space = impl_->sp.PieceToId("\xe2\x96\x81");  // U+2581
  for (char d = '0'; d <= '9'; ++d) {
    const std::string s(1, d);
    const int64_t tid = impl_->sp.PieceToId(s);
    const auto enc = impl_->encode(s);
    const bool single = enc == std::vector<int64_t>{tid} || enc == std::vector<int64_t>{space, tid};
    if (tid == impl_->sp.unk_id() || !single)
      fail(LOCLLM_ENGINE_ERROR, "digit '" + s + "' is not a single token in this tokenizer");
    ids.push_back(tid);
  }
  return ids;
}

std::string PromptTokenizer::decode(const std::vector<int64_t> &ids) const {
  std::vector<int> keep;
  const int64_t unk = impl_->sp.unk_id();
  for (int64_t i : ids)
    if (i >= 0 && i < impl_->vocab && i != bos_id && i != eos_id && i != pad_id && i != unk)
      keep.push_back(static_cast<int>(i));
  std::string text;
  const auto status = impl_->sp.Decode(keep, &text);
  if (!status.ok()) fail(LOCLLM_INTERNAL_ERROR, "SentencePiece cannot decode an answer: " + status.ToString());
  return text;
}

std::string PromptTokenizer::piece(int64_t id) const {
  if (id == im_patch_id) return kImagePatch;
  return impl_->sp.IdToPiece(static_cast<int>(id));
}

Grammar build_grammar(const PromptTokenizer &tok, int dims) {
  if (dims != 2 && dims != 3) fail(LOCLLM_ENGINE_ERROR, "coordinate dims must be 2 or 3, got " + std::to_string(dims));
  const std::vector<int> decimals = dims == 2 ? std::vector<int>{3, 3} : std::vector<int>{3, 3, 6};
  const auto digit_ids = tok.digit_ids();
  std::vector<std::string> values;
  std::string probe = "[";
  for (size_t i = 0; i < decimals.size(); ++i) {
    values.push_back("0." + std::string("123456789").substr(0, decimals[i]));
    probe += (i ? "," : "") + values.back();
  }
  probe += "]";
  const auto head = tok.round_ids("nose", "x");
  const auto full = tok.round_ids_with_answer("nose", "x", probe);
  if (full.size() <= head.size() || !std::equal(head.begin(), head.end(), full.begin()) || full.back() != tok.eos_id)
    fail(LOCLLM_ENGINE_ERROR, "answer tokens do not extend the prompt tokens; unsupported tokenizer");
  const std::vector<int64_t> answer(full.begin() + static_cast<long>(head.size()), full.end() - 1);
  if (answer.size() != probe.size())
    fail(LOCLLM_ENGINE_ERROR, "answer '" + probe + "' does not tokenise one character per token");
  Grammar g;
  g.dims = dims;
  g.digit_ids = digit_ids;
  g.eos_id = tok.eos_id;
  int pos = 1;
  for (const auto &v : values) {
    g.number_spans.emplace_back(pos, pos + static_cast<int>(v.size()));
    pos += static_cast<int>(v.size()) + 1;
  }
  for (size_t i = 0; i < answer.size(); ++i) {
    bool free = false;
    for (const auto &[a, b] : g.number_spans) free |= static_cast<int>(i) >= a + 2 && static_cast<int>(i) < b;
    if (free) {
      if (answer[i] != digit_ids[probe[i] - '0'])
        fail(LOCLLM_ENGINE_ERROR, "a digit of an answer is not the digit token");
      g.slots.push_back(Grammar::kFree);
    } else {
      g.slots.push_back(answer[i]);
    }
  }
  return g;
}

double ParsedAnswer::score() const {
  double s = 0;
  for (double v : scores) s += v;
  return s / static_cast<double>(scores.size());
}

ParsedAnswer parse_answer(const std::string &decoded, const std::vector<double> &confidence, int dims) {
  size_t a = 0, b = decoded.size();
  while (a < b && is_space(decoded[a])) ++a;
  while (b > a && is_space(decoded[b - 1])) --b;
  ParsedAnswer out;
  out.text = decoded.substr(a, b - a);
  const std::string &t = out.text;
  auto digit = [&](size_t i) { return i < t.size() && t[i] >= '0' && t[i] <= '9'; };
  // the official patterns: 2D "0\.\d+", 3D "\.\d+" (with "0" prepended)
  std::vector<std::string> found;
  for (size_t i = 0; i < t.size();) {
    const size_t dot = dims == 2 ? i + 1 : i;
    if ((dims == 3 || t[i] == '0') && dot < t.size() && t[dot] == '.' && digit(dot + 1)) {
      size_t e = dot + 1;
      while (digit(e)) ++e;
      found.push_back(t.substr(i, e - i));
      i = e;
    } else {
      ++i;
    }
  }
  out.values.assign(dims, 0.0);
  out.scores.assign(dims, 0.0);
  for (int k = 0; k < dims && k < static_cast<int>(found.size()); ++k) {
    std::string raw = found[k];
    out.values[k] = std::strtod((dims == 3 ? "0" + raw : raw).c_str(), nullptr);
    size_t pos = t.find(raw);
    if (dims == 3 && pos > 0 && t[pos - 1] == '0') {  // score the leading "0" too, as in 2D
      --pos;
      raw = "0" + raw;
    }
    double sum = 0;
    size_t n = 0;
    for (size_t i = pos; i < pos + raw.size() && i < confidence.size(); ++i, ++n) sum += confidence[i];
    out.scores[k] = n ? sum / static_cast<double>(n) : std::nan("");
  }
  return out;
}

}  // namespace locllm
