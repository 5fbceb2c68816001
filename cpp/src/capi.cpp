// The C API: every entry point catches everything and turns it into a status and a message.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "core.hpp"

struct locllm_pose {
  std::unique_ptr<locllm::Engine> engine;
  std::map<std::string, std::vector<const char *>> skeleton_names;
};

struct locllm_result {
  std::vector<locllm::PersonAnswers> persons;
  std::vector<std::string> names;
  int dims = 2;
};

namespace {

thread_local std::string last_error;

template <typename F>
locllm_status guarded(F &&body) {
  try {
    body();
    last_error.clear();
    return LOCLLM_OK;
  } catch (const locllm::Error &e) {
    last_error = e.what();
    return e.status;
  } catch (const std::bad_alloc &) {
    last_error = "out of memory";
    return LOCLLM_INTERNAL_ERROR;
  } catch (const std::exception &e) {  // ONNX Runtime's own failures during a run, and our defects
    last_error = std::string("internal error: ") + e.what();
    return LOCLLM_INTERNAL_ERROR;
  } catch (...) {
    last_error = "internal error: unknown exception";
    return LOCLLM_INTERNAL_ERROR;
  }
}

void need(const void *p, const char *what) {
  if (!p) locllm::fail(LOCLLM_ARGUMENT_ERROR, std::string(what) + " is NULL");
}

void check_image(const uint8_t *rgb, int width, int height, size_t stride) {
  need(rgb, "the image buffer");
  if (width < locllm::kMinImageSide || height < locllm::kMinImageSide)
    locllm::fail(LOCLLM_IMAGE_ERROR, "the image is " + std::to_string(width) + "x" + std::to_string(height) +
                                         " pixels, smaller than 2x2");
  if (static_cast<long long>(width) * height > locllm::kMaxImagePixels)
    locllm::fail(LOCLLM_IMAGE_ERROR, "the image is " + std::to_string(width) + "x" + std::to_string(height) +
                                         " pixels, over the limit of 89478485");
  if (stride < static_cast<size_t>(width) * 3)
    locllm::fail(LOCLLM_IMAGE_ERROR, "the image stride " + std::to_string(stride) + " is under 3 * width = " +
                                         std::to_string(static_cast<size_t>(width) * 3) + " bytes");
}

}  // namespace

extern "C" {

const char *locllm_last_error(void) { return last_error.c_str(); }

const char *locllm_status_name(locllm_status status) {
  switch (status) {
    case LOCLLM_OK: return "OK";
    case LOCLLM_ARGUMENT_ERROR: return "ArgumentError";
    case LOCLLM_BOX_ERROR: return "BoxError";
    case LOCLLM_IMAGE_ERROR: return "ImageError";
    case LOCLLM_KEYPOINT_ERROR: return "KeypointError";
    case LOCLLM_UNKNOWN_KEYPOINT_ERROR: return "UnknownKeypointError";
    case LOCLLM_PROTOCOL_ERROR: return "ProtocolError";
    case LOCLLM_ENGINE_ERROR: return "EngineError";
    case LOCLLM_BACKEND_UNAVAILABLE: return "BackendUnavailable";
    case LOCLLM_INTERNAL_ERROR: return "InternalError";
  }
  return "UnknownStatus";
}

void locllm_default_options(locllm_options *options) {
  if (options) *options = locllm_options{1, 0};
}

locllm_status locllm_create(const char *engine_dir, const locllm_options *options, locllm_pose **out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    need(engine_dir, "engine_dir");
    locllm_options opts;
    locllm_default_options(&opts);
    if (options) opts = *options;
    if (opts.threads < 0) locllm::fail(LOCLLM_ARGUMENT_ERROR, "threads must be >= 0, got " + std::to_string(opts.threads));
    auto pose = std::make_unique<locllm_pose>();
    pose->engine = std::make_unique<locllm::Engine>(engine_dir, opts.verify != 0, opts.threads);
    for (const auto &[name, kps] : pose->engine->library.skeletons)
      for (const auto &k : kps) pose->skeleton_names[name].push_back(k.c_str());
    *out = pose.release();
  });
}

void locllm_destroy(locllm_pose *pose) { delete pose; }

int locllm_coord_dims(const locllm_pose *pose) { return pose ? pose->engine->manifest.coord_dims : 0; }

locllm_status locllm_skeleton(const locllm_pose *pose, const char *skeleton, const char *const **names,
                              size_t *count) {
  return guarded([&] {
    need(pose, "pose");
    need(skeleton, "skeleton");
    need(names, "names");
    need(count, "count");
    const auto it = pose->skeleton_names.find(skeleton);
    if (it == pose->skeleton_names.end()) {
      std::string known;
      for (const auto &kv : pose->skeleton_names) known += (known.empty() ? "" : ", ") + kv.first;
      locllm::fail(LOCLLM_KEYPOINT_ERROR, std::string("unknown skeleton '") + skeleton + "' (the library has: " + known + ")");
    }
    *names = it->second.data();
    *count = it->second.size();
  });
}

locllm_status locllm_locate(locllm_pose *pose, const uint8_t *rgb, int width, int height, size_t stride,
                            const double *boxes, size_t n_boxes, const locllm_keypoint *keypoints, size_t n_keypoints,
                            locllm_result **out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    need(pose, "pose");
    check_image(rgb, width, height, stride);
    if (n_boxes && !boxes) locllm::fail(LOCLLM_ARGUMENT_ERROR, "boxes is NULL with n_boxes " + std::to_string(n_boxes));
    const auto requests = pose->engine->library.resolve(keypoints, n_keypoints);
    std::vector<std::array<double, 4>> box_list;
    if (!boxes) box_list.push_back({0.0, 0.0, static_cast<double>(width), static_cast<double>(height)});
    for (size_t i = 0; boxes && i < n_boxes; ++i) box_list.push_back({boxes[4 * i], boxes[4 * i + 1], boxes[4 * i + 2], boxes[4 * i + 3]});
    auto result = std::make_unique<locllm_result>();
    result->persons = pose->engine->locate(rgb, width, height, stride, box_list, requests);
    for (const auto &r : requests) result->names.push_back(r.name);
    result->dims = pose->engine->manifest.coord_dims;
    *out = result.release();
  });
}

size_t locllm_result_persons(const locllm_result *result) { return result ? result->persons.size() : 0; }

size_t locllm_result_keypoints(const locllm_result *result) { return result ? result->names.size() : 0; }

locllm_status locllm_result_point(const locllm_result *result, size_t person, size_t keypoint, locllm_point *out) {
  return guarded([&] {
    need(result, "result");
    need(out, "out");
    if (person >= result->persons.size() || keypoint >= result->names.size())
      locllm::fail(LOCLLM_ARGUMENT_ERROR, "person " + std::to_string(person) + ", keypoint " + std::to_string(keypoint) +
                                              " is outside the result (" + std::to_string(result->persons.size()) +
                                              " persons x " + std::to_string(result->names.size()) + " keypoints)");
    const auto &p = result->persons[person];
    const double z = p.values[keypoint][2];
    // protocol.unit_to_depth: z = (unit - 0.5) * 2000 mm
    *out = locllm_point{p.values[keypoint][0], p.values[keypoint][1], result->dims == 3 ? (z - 0.5) * 2000.0 : NAN,
                        p.scores[keypoint], result->names[keypoint].c_str(), p.texts[keypoint].c_str()};
  });
}

locllm_status locllm_result_box(const locllm_result *result, size_t person, double box[4]) {
  return guarded([&] {
    need(result, "result");
    need(box, "box");
    if (person >= result->persons.size())
      locllm::fail(LOCLLM_ARGUMENT_ERROR, "person " + std::to_string(person) + " is outside the result (" +
                                              std::to_string(result->persons.size()) + " persons)");
    std::memcpy(box, result->persons[person].box.data(), 4 * sizeof(double));
  });
}

void locllm_result_free(locllm_result *result) { delete result; }

locllm_status locllm_load_image(const char *path, uint8_t **rgb, int *width, int *height) {
  return guarded([&] {
    need(rgb, "rgb");
    *rgb = nullptr;
    need(path, "path");
    need(width, "width");
    need(height, "height");
    const locllm::Image img = locllm::load_image(path);
    auto *buf = static_cast<uint8_t *>(std::malloc(img.rgb.size()));
    if (!buf) throw std::bad_alloc();
    std::memcpy(buf, img.rgb.data(), img.rgb.size());
    *rgb = buf;
    *width = img.width;
    *height = img.height;
  });
}

void locllm_image_free(uint8_t *rgb) { std::free(rgb); }

locllm_status locllm_crop(const uint8_t *rgb, int width, int height, size_t stride, const double box[4], int size,
                          uint8_t *out) {
  return guarded([&] {
    check_image(rgb, width, height, stride);
    need(box, "box");
    need(out, "out");
    if (size < 1 || size > 4096) locllm::fail(LOCLLM_ARGUMENT_ERROR, "crop size must be 1..4096, got " + std::to_string(size));
    const auto g = locllm::crop_geometry(box, width, height, size, 0);
    locllm::warp_affine(rgb, width, height, stride, g.forward, size, out);
  });
}

}  // extern "C"
