/* locllm: the C API of the LocLLM keypoint localizer's C++ runtime.
 *
 * The same engine directory and answers as the Python SDK's Pose(engine_dir).locate(...):
 * manifest checks, tokenizer, crop (OpenCV 4.x warpAffine, bit for bit), vision graph, cascade
 * decoder graph (decoder_shared.onnx; decoder.onnx for engines without it), constrained
 * jump-forward decoding, the official scores and back-projection to image pixels.
 *
 * Every function returns a status; on failure locllm_last_error() gives a message (this
 * thread's last failure) naming the input and the problem. Nothing aborts on bad input.
 *
 *   locllm_pose *pose;
 *   if (locllm_create("engine_dir", NULL, &pose) != LOCLLM_OK) puts(locllm_last_error());
 *   locllm_keypoint kp[] = {{"neck", NULL}, {"chin", "The chin is the lowest point of the face."}};
 *   double box[4] = {10, 20, 200, 380};                  // x, y, w, h in pixels
 *   locllm_result *res;
 *   locllm_locate(pose, rgb, width, height, width * 3, box, 1, kp, 2, &res);
 *   locllm_point p; locllm_result_point(res, 0, 0, &p);  // p.x, p.y, p.score, p.answer
 *   locllm_result_free(res); locllm_destroy(pose);
 */
#ifndef LOCLLM_LOCLLM_H
#define LOCLLM_LOCLLM_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define LOCLLM_API __attribute__((visibility("default")))
#else
#define LOCLLM_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* The Python SDK's error types, one code each. */
typedef enum locllm_status {
  LOCLLM_OK = 0,
  LOCLLM_ARGUMENT_ERROR = 1,         /* a NULL pointer, a bad option */
  LOCLLM_BOX_ERROR = 2,              /* a box that is degenerate, non-finite or outside the image */
  LOCLLM_IMAGE_ERROR = 3,            /* an image that is missing, damaged, too small or too large */
  LOCLLM_KEYPOINT_ERROR = 4,         /* empty or repeated keypoint requests */
  LOCLLM_UNKNOWN_KEYPOINT_ERROR = 5, /* a name the description library does not know, without a description */
  LOCLLM_PROTOCOL_ERROR = 6,         /* control tokens in a caller's text, a prompt past the context */
  LOCLLM_ENGINE_ERROR = 7,           /* a missing, modified or malformed engine file */
  LOCLLM_BACKEND_UNAVAILABLE = 8,    /* ONNX Runtime cannot run the graphs */
  LOCLLM_INTERNAL_ERROR = 9          /* a defect of this library */
} locllm_status;

typedef struct locllm_pose locllm_pose;
typedef struct locllm_result locllm_result;

typedef struct locllm_options {
  int verify;  /* nonzero (default): check every engine file's sha256; 0: sizes only */
  int threads; /* ONNX Runtime intra-op threads; 0: LOCLLM_THREADS or ONNX Runtime's default */
} locllm_options;

/* A keypoint request: a library name (description NULL) or a name with its own description. */
typedef struct locllm_keypoint {
  const char *name;
  const char *description;
} locllm_keypoint;

typedef struct locllm_point {
  double x, y;        /* image pixels */
  double z;           /* 3D engines: root-relative depth in mm; NaN for 2D engines */
  double score;       /* the official score: mean confidence of the answer's numbers */
  const char *name;   /* the request's name (the library's spelling), owned by the result */
  const char *answer; /* the model's answer text, e.g. "[0.412,0.905]", owned by the result */
} locllm_point;

LOCLLM_API const char *locllm_last_error(void);
LOCLLM_API const char *locllm_status_name(locllm_status status);
LOCLLM_API void locllm_default_options(locllm_options *options);

/* Load an engine directory (manifest.json, graphs, tokenizer, descriptions.yaml). */
LOCLLM_API locllm_status locllm_create(const char *engine_dir, const locllm_options *options, locllm_pose **out);
LOCLLM_API void locllm_destroy(locllm_pose *pose);
/* 2 or 3: the coordinates an answer holds. */
LOCLLM_API int locllm_coord_dims(const locllm_pose *pose);
/* The keypoint names of a skeleton of the engine's library ("coco17"): *names stays valid as long as pose. */
LOCLLM_API locllm_status locllm_skeleton(const locllm_pose *pose, const char *skeleton, const char *const **names,
                                         size_t *count);

/* Keypoints for each box of an RGB image (uint8, rows of `stride` bytes, 3 bytes per pixel).
 * boxes: n_boxes x [x, y, w, h] (NULL with n_boxes 0: the whole image). */
LOCLLM_API locllm_status locllm_locate(locllm_pose *pose, const uint8_t *rgb, int width, int height, size_t stride,
                                       const double *boxes, size_t n_boxes, const locllm_keypoint *keypoints,
                                       size_t n_keypoints, locllm_result **out);
LOCLLM_API size_t locllm_result_persons(const locllm_result *result);
LOCLLM_API size_t locllm_result_keypoints(const locllm_result *result);
LOCLLM_API locllm_status locllm_result_point(const locllm_result *result, size_t person, size_t keypoint,
                                             locllm_point *out);
/* The person's box as used, [x, y, w, h]. */
LOCLLM_API locllm_status locllm_result_box(const locllm_result *result, size_t person, double box[4]);
LOCLLM_API void locllm_result_free(locllm_result *result);

/* A JPEG or PNG file -> RGB pixels (free with locllm_image_free); damaged files are refused. */
LOCLLM_API locllm_status locllm_load_image(const char *path, uint8_t **rgb, int *width, int *height);
LOCLLM_API void locllm_image_free(uint8_t *rgb);
/* The model input crop of a box: size x size x 3 RGB bytes into out, as the Python SDK's crop.warp. */
LOCLLM_API locllm_status locllm_crop(const uint8_t *rgb, int width, int height, size_t stride, const double box[4],
                                     int size, uint8_t *out);

#ifdef __cplusplus
}
#endif
#endif /* LOCLLM_LOCLLM_H */
