// manifest.py in C++: manifest.json read with errors naming the field, the files checked
// (listed, inside the engine directory, size and sha256) before anything opens them.
#include <openssl/evp.h>
#include <sys/stat.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core.hpp"

namespace locllm {
namespace {

constexpr const char *kFormat = "locllm-engine";
constexpr int kFormatVersion = 1;
// protocol.py's GROUPED_PROTOCOL_VERSION: body-part rounds, which this runtime does not ask
constexpr const char *kGroupedProtocolVersion = "locllm-grouped-v1";

using nlohmann::json;

struct Fields {  // one JSON object of the manifest; errors name "where.key"
  std::string source, where;
  const json &data;
  std::string name(const std::string &key) const { return where.empty() ? key : where + "." + key; }
  [[noreturn]] void bad(const std::string &key, const std::string &what) const {
    fail(LOCLLM_ENGINE_ERROR, source + ": manifest field '" + name(key) + "' " + what);
  }
  const json &raw(const std::string &key) const {
    if (!data.contains(key) || data[key].is_null()) bad(key, "is missing");
    return data[key];
  }
  bool has(const std::string &key) const { return data.contains(key) && !data[key].is_null(); }
  int64_t integer(const std::string &key) const {
    const json &v = raw(key);
    if (!v.is_number_integer()) bad(key, "must be an integer, got " + v.dump());
    return v.get<int64_t>();
  }
  int small(const std::string &key) const {
    const int64_t v = integer(key);
    if (v < 0 || v > INT_MAX) bad(key, "is out of range: " + std::to_string(v));
    return static_cast<int>(v);
  }
  std::string str(const std::string &key) const {
    const json &v = raw(key);
    if (!v.is_string()) bad(key, "must be a string, got " + v.dump());
    return v.get<std::string>();
  }
  bool boolean(const std::string &key) const {
    const json &v = raw(key);
    if (!v.is_boolean()) bad(key, "must be true or false, got " + v.dump());
    return v.get<bool>();
  }
  std::vector<int64_t> ints(const std::string &key) const {
    const json &v = raw(key);
    if (!v.is_array()) bad(key, "must be a list of integers");
    std::vector<int64_t> out;
    for (const auto &x : v) {
      if (!x.is_number_integer()) bad(key, "must be a list of integers");
      out.push_back(x.get<int64_t>());
    }
    return out;
  }
  std::vector<std::string> strs(const std::string &key) const {
    const json &v = raw(key);
    if (!v.is_array()) bad(key, "must be a list of strings");
    std::vector<std::string> out;
    for (const auto &x : v) {
      if (!x.is_string()) bad(key, "must be a list of strings");
      out.push_back(x.get<std::string>());
    }
    return out;
  }
  std::array<float, 3> floats3(const std::string &key) const {
    const json &v = raw(key);
    if (!v.is_array() || v.size() != 3) bad(key, "must hold 3 numbers");
    std::array<float, 3> out{};
    for (size_t i = 0; i < 3; ++i) {
      if (!v[i].is_number()) bad(key, "must be a list of numbers");
      out[i] = static_cast<float>(v[i].get<double>());  // np.asarray(mean, np.float32)
    }
    return out;
  }
  Fields obj(const std::string &key) const {
    const json &v = raw(key);
    if (!v.is_object()) bad(key, "must be an object");
    return Fields{source, name(key), v};
  }
};

bool is_file(const std::string &path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string real_path(const std::string &path) {
  char buf[PATH_MAX];
  return ::realpath(path.c_str(), buf) ? std::string(buf) : std::string();
}

}  // namespace

std::string sha256_file(const std::string &path) {
  std::FILE *f = std::fopen(path.c_str(), "rb");
  if (!f) fail(LOCLLM_ENGINE_ERROR, path + ": cannot read the file");
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<unsigned char> buf(1 << 22);
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) EVP_DigestUpdate(ctx, buf.data(), n);
  const bool read_error = std::ferror(f) != 0;
  std::fclose(f);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, md, &len);
  EVP_MD_CTX_free(ctx);
  if (read_error) fail(LOCLLM_ENGINE_ERROR, path + ": read error while computing its sha256");
  static const char *hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

Manifest Manifest::read(const std::string &engine_dir) {
  struct stat st {};
  if (::stat(engine_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    fail(LOCLLM_ENGINE_ERROR, "engine directory not found: " + engine_dir);
  const std::string source = engine_dir + "/manifest.json";
  if (!is_file(source)) fail(LOCLLM_ENGINE_ERROR, engine_dir + " is not an engine directory: manifest.json is missing");
  json data;
  try {
    std::ifstream in(source);
    data = json::parse(in);
  } catch (const json::exception &e) {
    fail(LOCLLM_ENGINE_ERROR, source + ": not valid JSON (" + e.what() + ")");
  }
  if (!data.is_object()) fail(LOCLLM_ENGINE_ERROR, source + ": a manifest is a JSON object");
  if (!data.contains("format") || data["format"] != kFormat)
    fail(LOCLLM_ENGINE_ERROR, source + ": not a locllm-engine manifest (format=" +
                                  (data.contains("format") ? data["format"].dump() : "null") + ")");
  if (!data.contains("format_version") || data["format_version"] != kFormatVersion)
    fail(LOCLLM_ENGINE_ERROR,
         source + ": engine format_version " + (data.contains("format_version") ? data["format_version"].dump() : "null") +
             " is not supported by this runtime (it reads version 1); rebuild the engine with export/build_engines.py");
  for (const char *key : {"model", "tokenizer", "files", "backends"})
    if (!data.contains(key)) fail(LOCLLM_ENGINE_ERROR, source + ": manifest has no '" + key + "' section");
  const Fields f{source, "", data};
  Manifest m;
  m.dir = engine_dir;
  const std::string protocol = f.str("protocol_version");
  if (protocol == kGroupedProtocolVersion)
    fail(LOCLLM_ENGINE_ERROR, source + ": engine protocol '" + protocol +
                                  "' asks body-part groups (one answer per group), and this runtime asks one keypoint "
                                  "per round ('" + kProtocolVersion + "'): serve this engine with the Python SDK");
  if (protocol != kProtocolVersion)
    fail(LOCLLM_ENGINE_ERROR, "engine protocol '" + protocol + "' differs from this runtime's '" + kProtocolVersion + "'");
  const Fields model = f.obj("model");
  m.coord_dims = model.small("coord_dims");
  m.image_size = model.small("image_size");
  m.patch_size = model.small("patch_size");
  m.num_patches = model.small("num_patches");
  m.norm_mean = model.floats3("norm_mean");
  m.norm_std = model.floats3("norm_std");
  m.hidden_size = model.small("hidden_size");
  m.vocab_size = model.small("vocab_size");
  m.num_layers = model.small("num_layers");
  m.num_heads = model.small("num_heads");
  m.num_kv_heads = model.has("num_kv_heads") ? model.small("num_kv_heads") : m.num_heads;
  m.head_dim = model.has("head_dim") ? model.small("head_dim") : m.hidden_size / std::max(m.num_heads, 1);
  m.max_position_embeddings = model.small("max_position_embeddings");
  if (m.patch_size < 1 || m.image_size < 1 || m.num_patches != (m.image_size / m.patch_size) * (m.image_size / m.patch_size))
    fail(LOCLLM_ENGINE_ERROR, engine_dir + ": manifest fields 'model.num_patches' and 'model.image_size' / "
                                           "'model.patch_size' disagree");
  const Fields tok = f.obj("tokenizer");
  m.legacy = tok.boolean("legacy");
  m.bos_id = tok.integer("bos_id");
  m.eos_id = tok.integer("eos_id");
  m.pad_id = tok.integer("pad_id");
  m.im_patch_id = tok.integer("im_patch_id");
  m.prefix_ids = tok.ints("prefix_ids");
  if (tok.has("dir")) m.tokenizer_dir = tok.str("dir");
  const Fields grammar = tok.obj("answer_grammar");
  m.grammar.dims = grammar.small("dims");
  m.grammar.slots = grammar.ints("slots");
  m.grammar.digit_ids = grammar.ints("digit_ids");
  m.grammar.eos_id = grammar.integer("eos_id");
  for (const auto &span : grammar.raw("number_spans")) {
    if (!span.is_array() || span.size() != 2 || !span[0].is_number_integer() || !span[1].is_number_integer())
      grammar.bad("number_spans", "must be a list of [start, end] pairs");
    m.grammar.number_spans.emplace_back(span[0].get<int>(), span[1].get<int>());
  }
  if (m.grammar.dims != m.coord_dims)
    fail(LOCLLM_ENGINE_ERROR, engine_dir + ": manifest field 'model.coord_dims' is " + std::to_string(m.coord_dims) +
                                  ", but its answer grammar answers " + std::to_string(m.grammar.dims) +
                                  " coordinates");
  if (m.grammar.digit_ids.size() != 10) grammar.bad("digit_ids", "must hold 10 token ids");
  const Fields backends = f.obj("backends");
  if (!backends.has("onnxruntime"))
    fail(LOCLLM_ENGINE_ERROR, source + ": this engine has no 'onnxruntime' build (the C++ runtime runs ONNX graphs)");
  const Fields ort = backends.obj("onnxruntime");
  m.vision = ort.str("vision");
  m.decoder = ort.str("decoder");
  m.embeddings = ort.str("embeddings");
  if (ort.has("decoder_shared")) m.decoder_shared = ort.str("decoder_shared");
  // graphs past 2 GiB read their weights from these files (ONNX Runtime opens them itself)
  if (ort.has("external_data")) m.external_data = ort.strs("external_data");
  const Fields files = f.obj("files");
  for (const auto &[name, entry] : files.data.items()) {
    const Fields e = files.obj(name);
    m.files[name] = FileEntry{e.integer("bytes"), e.str("sha256")};
  }
  return m;
}

std::string Manifest::path(const std::string &name) const {
  if (!files.count(name)) fail(LOCLLM_ENGINE_ERROR, dir + ": '" + name + "' is not listed in the manifest's files");
  const std::string root = real_path(dir), full = dir + "/" + name, resolved = real_path(full);
  if (!resolved.empty() && resolved.compare(0, root.size() + 1, root + "/") != 0)
    fail(LOCLLM_ENGINE_ERROR, dir + ": manifest file '" + name + "' lies outside the engine directory");
  return full;
}

void Manifest::verify_files(bool checksums) const {
  // the files the ONNX Runtime build opens, and the shared ones (tokenizer, descriptions)
  std::vector<std::string> names;
  const std::string prefix = tokenizer_dir + "/";
  for (const auto &[name, entry] : files)
    if (name.compare(0, prefix.size(), prefix) == 0 || name == "descriptions.yaml") names.push_back(name);
  std::vector<std::string> own{vision, decoder, decoder_shared, embeddings};
  own.insert(own.end(), external_data.begin(), external_data.end());
  for (const std::string &name : own) {
    if (name.empty()) continue;
    if (!files.count(name))
      fail(LOCLLM_ENGINE_ERROR, "backends.onnxruntime names " + name +
                                    ", which the manifest's files section does not list (every file the runtime "
                                    "opens must carry a checksum)");
    names.push_back(name);
  }
  for (const char *read : {"tokenizer.model", "tokenizer_config.json", "added_tokens.json"}) {
    const std::string name = prefix + read;  // a tokenizer file the runtime reads must be listed
    if (is_file(dir + "/" + name)) path(name);
  }
  for (const auto &name : names) {
    const FileEntry &meta = files.at(name);
    const std::string p = path(name);
    struct stat st {};
    if (::stat(p.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
      fail(LOCLLM_ENGINE_ERROR, dir + ": engine file " + name + " is missing");
    if (st.st_size != meta.bytes)
      fail(LOCLLM_ENGINE_ERROR, p + ": size " + std::to_string(st.st_size) + " differs from the manifest's " +
                                    std::to_string(meta.bytes) + " (truncated or replaced)");
    if (checksums && sha256_file(p) != meta.sha256)
      fail(LOCLLM_ENGINE_ERROR, p + ": sha256 differs from the manifest (corrupt or modified file)");
  }
}

}  // namespace locllm
