// The C++ runtime's internals: one header for the pieces the C API composes.
// Each piece mirrors one module of the Python SDK (named beside it); the facts they share
// (protocol texts, grammar, crop constants) are read from the engine's manifest where it has them.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "locllm/locllm.h"

namespace locllm {

// errors.py: one exception type carrying the C API's status.
class Error : public std::runtime_error {
 public:
  Error(locllm_status status, const std::string &message) : std::runtime_error(message), status(status) {}
  locllm_status status;
};

[[noreturn]] inline void fail(locllm_status status, const std::string &message) { throw Error(status, message); }

// --------------------------------------------------------------------------------------
// crop.py

constexpr double kPixelStd = 200.0;
constexpr int kMinImageSide = 2;
constexpr long long kMaxImagePixels = 89478485;  // Pillow's default limit, as load_image
constexpr double kMinBoxSide = 2.0;              // inputs.py MIN_BOX_SIDE

struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height * width * 3
};

struct CropGeometry {
  std::array<double, 6> forward;  // 2x3 image -> crop
  std::array<double, 6> inverse;  // 2x3 crop -> image
  int size = 0;
};

// inputs.validate_boxes (xywh) then crop.crop_geometry: BoxError naming box `index`.
CropGeometry crop_geometry(const double box[4], int width, int height, int size, size_t index);
// cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT 0) of OpenCV 4.x on RGB rows of `stride` bytes.
void warp_affine(const uint8_t *rgb, int width, int height, size_t stride, const std::array<double, 6> &forward,
                 int size, uint8_t *out);
// crop.normalize: size x size x 3 uint8 -> 3 x size x size float32 planes, appended to out.
void normalize(const uint8_t *crop, int size, const std::array<float, 3> &mean, const std::array<float, 3> &std,
               float *out);
Image load_image(const std::string &path);

// --------------------------------------------------------------------------------------
// manifest.py

struct FileEntry {
  long long bytes = 0;
  std::string sha256;
};

struct Grammar {  // protocol.AnswerGrammar
  int dims = 2;
  std::vector<int64_t> slots;  // -1 where a digit is free
  std::vector<std::pair<int, int>> number_spans;
  std::vector<int64_t> digit_ids;
  int64_t eos_id = 0;
  static constexpr int64_t kFree = -1;
  bool operator==(const Grammar &o) const {
    return dims == o.dims && slots == o.slots && number_spans == o.number_spans && digit_ids == o.digit_ids &&
           eos_id == o.eos_id;
  }
};

struct Manifest {
  std::string dir;
  int coord_dims = 2, image_size = 0, patch_size = 0, num_patches = 0;
  std::array<float, 3> norm_mean{}, norm_std{};
  int hidden_size = 0, vocab_size = 0, num_layers = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int max_position_embeddings = 0;
  // tokenizer
  bool legacy = true;
  int64_t bos_id = 0, eos_id = 0, pad_id = 0, im_patch_id = 0;
  Grammar grammar;
  std::vector<int64_t> prefix_ids;
  std::string tokenizer_dir = "tokenizer";
  // backends.onnxruntime
  std::string vision, decoder, decoder_shared, embeddings;
  std::vector<std::string> external_data;  // ONNX external-data files of the graphs
  std::map<std::string, FileEntry> files;

  static Manifest read(const std::string &engine_dir);
  // the file `name`: listed, inside the engine directory
  std::string path(const std::string &name) const;
  // size (and sha256 when `checksums`) of each file the runtime opens
  void verify_files(bool checksums) const;
};

std::string sha256_file(const std::string &path);

// --------------------------------------------------------------------------------------
// protocol.py

constexpr const char *kProtocolVersion = "locllm-v1";

void check_user_text(const std::string &text, const std::string &what);

class PromptTokenizer {
 public:
  explicit PromptTokenizer(const std::string &tokenizer_dir);
  ~PromptTokenizer();
  std::vector<int64_t> encode(const std::string &text, bool add_bos) const;
  std::vector<int64_t> prefix_ids(int num_patches) const;
  std::vector<int64_t> round_ids(const std::string &name, const std::string &description) const;
  std::vector<int64_t> round_ids_with_answer(const std::string &name, const std::string &description,
                                             const std::string &answer) const;
  std::vector<int64_t> digit_ids() const;
  std::string decode(const std::vector<int64_t> &ids) const;
  std::string piece(int64_t id) const;
  bool legacy = true, add_bos = true;
  int64_t bos_id = 0, eos_id = 0, pad_id = 0, im_patch_id = 0;

 private:
  std::vector<int64_t> encode_chunk(const std::string &chunk, bool opens_text) const;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

Grammar build_grammar(const PromptTokenizer &tokenizer, int dims);

struct ParsedAnswer {  // protocol.ParsedAnswer
  std::vector<double> values, scores;
  std::string text;
  double score() const;
};
// protocol.parse_answer: `confidence[t]` for answer characters' steps (the last step dropped).
ParsedAnswer parse_answer(const std::string &decoded, const std::vector<double> &confidence, int dims);

// --------------------------------------------------------------------------------------
// descriptions.py

struct KeypointRequest {
  std::string name, description;
};

class DescriptionLibrary {
 public:
  static DescriptionLibrary load(const std::string &path);
  // DescriptionLibrary.resolve for a list of (name, description-or-null)
  std::vector<KeypointRequest> resolve(const locllm_keypoint *keypoints, size_t n) const;
  std::map<std::string, std::string> descriptions;
  std::map<std::string, std::vector<std::string>> skeletons;
};

// --------------------------------------------------------------------------------------
// pipeline.py + decoding.py + backends/onnxruntime.py

struct PersonAnswers {
  std::array<double, 4> box{};
  std::vector<std::array<double, 3>> values;  // x, y in pixels; z in the protocol's unit
  std::vector<double> scores;
  std::vector<std::string> texts;
};

class Engine {
 public:
  Engine(const std::string &engine_dir, bool verify, int threads);
  ~Engine();
  std::vector<PersonAnswers> locate(const uint8_t *rgb, int width, int height, size_t stride,
                                    const std::vector<std::array<double, 4>> &boxes,
                                    const std::vector<KeypointRequest> &requests);
  Manifest manifest;
  DescriptionLibrary library;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace locllm
