// crop.py in C++: box -> center/scale (aspect 1, /200) -> cv2.getAffineTransform -> OpenCV 4.x
// warpAffine (INTER_LINEAR), the same integers as the Python port; normalisation as torchvision's.
// Compiled with -ffp-contract=off: every float and double operation rounds as numpy's do.
#include <algorithm>
#include <cmath>
#include <sstream>

#include "core.hpp"

namespace locllm {
namespace {

std::string box_text(const double box[4]) {
  std::ostringstream s;
  s.precision(17);
  s << "[" << box[0] << ", " << box[1] << ", " << box[2] << ", " << box[3] << "]";
  return s.str();
}

// cv::getAffineTransform: the 6x6 system solved by cv::solve (DECOMP_LU): Gaussian elimination
// with partial pivoting, back substitution dividing by the pivot (checked against OpenCV's results).
bool affine_from_points(const float src[3][2], const float dst[3][2], std::array<double, 6> &out) {
  double a[6][6] = {}, b[6];
  for (int i = 0; i < 3; ++i) {
    a[2 * i][0] = a[2 * i + 1][3] = src[i][0];
    a[2 * i][1] = a[2 * i + 1][4] = src[i][1];
    a[2 * i][2] = a[2 * i + 1][5] = 1.0;
    b[2 * i] = dst[i][0];
    b[2 * i + 1] = dst[i][1];
  }
  const int m = 6;
  for (int i = 0; i < m; ++i) {
    int k = i;
    for (int j = i + 1; j < m; ++j)
      if (std::fabs(a[j][i]) > std::fabs(a[k][i])) k = j;
    if (std::fabs(a[k][i]) < 2.220446049250313e-16 * 100) return false;  // DBL_EPSILON * 100
    if (k != i) {
      for (int j = i; j < m; ++j) std::swap(a[i][j], a[k][j]);
      std::swap(b[i], b[k]);
    }
    const double d = -1.0 / a[i][i];
    for (int j = i + 1; j < m; ++j) {
      const double alpha = a[j][i] * d;
      for (int c = i + 1; c < m; ++c) a[j][c] += alpha * a[i][c];
      b[j] += alpha * b[i];
    }
  }
  for (int i = m - 1; i >= 0; --i) {
    double s = b[i];
    for (int c = i + 1; c < m; ++c) s -= a[i][c] * b[c];
    b[i] = s / a[i][i];
  }
  for (int i = 0; i < 6; ++i) out[i] = b[i];
  return true;
}

}  // namespace

CropGeometry crop_geometry(const double box[4], int width, int height, int size, size_t index) {
  const std::string name = "box " + std::to_string(index) + " " + box_text(box);
  const double x = box[0], y = box[1], w = box[2], h = box[3];
  if (!std::isfinite(x) || !std::isfinite(y) || !std::isfinite(w) || !std::isfinite(h))
    fail(LOCLLM_BOX_ERROR, name + " has non-finite values");
  if (w < kMinBoxSide || h < kMinBoxSide)
    fail(LOCLLM_BOX_ERROR, name + " (xywh) is degenerate: under 2 pixels wide or high");
  if (x >= width || y >= height || x + w <= 0 || y + h <= 0)
    fail(LOCLLM_BOX_ERROR, name + " (xywh) lies outside the " + std::to_string(width) + "x" + std::to_string(height) +
                               " image");
  // sanitize_box (COCO loaders' clean_bbox)
  const double x1 = std::max(0.0, x), y1 = std::max(0.0, y);
  const double x2 = std::min(width - 1.0, x1 + std::max(0.0, w - 1.0));
  const double y2 = std::min(height - 1.0, y1 + std::max(0.0, h - 1.0));
  double bw = x2 - x1, bh = y2 - y1;
  if (bw <= 0 && bh <= 0)
    fail(LOCLLM_BOX_ERROR, name + " covers no pixel area once clipped to the image (it touches only its corner)");
  // box_to_center_scale: float32 center and scale
  const float center[2] = {static_cast<float>(x1 + bw * 0.5), static_cast<float>(y1 + bh * 0.5)};
  if (bw > bh)
    bh = bw;
  else if (bw < bh)
    bw = bh;
  const float scale_w = static_cast<float>(bw * 1.0 / kPixelStd);
  // affine_transform (rotation 0): src_dir (0, -w/2), dst_dir (0, -size/2), third points
  const float src_w = scale_w * static_cast<float>(kPixelStd);
  const float half = static_cast<float>(size * 0.5);
  float src[3][2], dst[3][2];
  src[0][0] = center[0];
  src[0][1] = center[1];
  src[1][0] = center[0] + 0.0f;
  src[1][1] = center[1] + static_cast<float>(static_cast<double>(src_w * -0.5f) * 1.0);
  dst[0][0] = dst[0][1] = half;
  dst[1][0] = half;
  dst[1][1] = static_cast<float>(size * 0.5 + static_cast<double>(static_cast<float>(size * -0.5)));
  for (auto *p : {src, dst}) {  // _third_point(p[0], p[1])
    const float d0 = p[0][0] - p[1][0], d1 = p[0][1] - p[1][1];
    p[2][0] = p[1][0] + -d1;
    p[2][1] = p[1][1] + d0;
  }
  CropGeometry g;
  g.size = size;
  if (!affine_from_points(src, dst, g.forward) || !affine_from_points(dst, src, g.inverse))
    fail(LOCLLM_BOX_ERROR, name + " gives a singular crop transform");
  return g;
}

void warp_affine(const uint8_t *rgb, int width, int height, size_t stride, const std::array<double, 6> &m, int size,
                 uint8_t *out) {
  // cv::warpAffine's in-place inversion, operation for operation
  const double m0 = m[0], m1 = m[1], m2 = m[2], m3 = m[3], m4 = m[4], m5 = m[5];
  double d = m0 * m4 - m1 * m3;
  d = d != 0 ? 1.0 / d : 0.0;
  const double a0 = m4 * d, a1 = m1 * -d, a3 = m3 * -d, a4 = m0 * d;
  const double a2 = -a0 * m2 - a1 * m5, a5 = -a3 * m2 - a4 * m5;
  constexpr int kAbBits = 10, kInterBits = 5, kTab = 1 << kInterBits;
  const double scale = static_cast<double>(1 << kAbBits);
  const int64_t half = 1 << (kAbBits - kInterBits - 1);
  std::vector<int64_t> adelta(size), bdelta(size);
  for (int x = 0; x < size; ++x) {
    adelta[x] = std::llrint(a0 * x * scale);  // cvRound: half to even
    bdelta[x] = std::llrint(a3 * x * scale);
  }
  for (int y = 0; y < size; ++y) {
    const int64_t x0 = std::llrint((a1 * y + a2) * scale) + half;
    const int64_t y0 = std::llrint((a4 * y + a5) * scale) + half;
    for (int x = 0; x < size; ++x) {
      const int64_t fix_x = (x0 + adelta[x]) >> (kAbBits - kInterBits);
      const int64_t fix_y = (y0 + bdelta[x]) >> (kAbBits - kInterBits);
      const int64_t sx = fix_x >> kInterBits, sy = fix_y >> kInterBits;
      const int32_t fx = static_cast<int32_t>(fix_x & (kTab - 1)), fy = static_cast<int32_t>(fix_y & (kTab - 1));
      // corner weights, zero where a corner lies outside the image (BORDER_CONSTANT 0)
      const int32_t wx[2] = {(sx >= 0 && sx < width) ? kTab - fx : 0, (sx >= -1 && sx < width - 1) ? fx : 0};
      const int32_t wy[2] = {(sy >= 0 && sy < height) ? kTab - fy : 0, (sy >= -1 && sy < height - 1) ? fy : 0};
      const int64_t col[2] = {std::clamp<int64_t>(sx, 0, width - 1), std::clamp<int64_t>(sx + 1, 0, width - 1)};
      const int64_t row[2] = {std::clamp<int64_t>(sy, 0, height - 1), std::clamp<int64_t>(sy + 1, 0, height - 1)};
      for (int c = 0; c < 3; ++c) {
        int32_t acc = 1 << (2 * kInterBits - 1);
        for (int r = 0; r < 2; ++r) {
          const uint8_t *line = rgb + static_cast<size_t>(row[r]) * stride;
          acc += (line[col[0] * 3 + c] * wx[0] + line[col[1] * 3 + c] * wx[1]) * wy[r];
        }
        out[(static_cast<size_t>(y) * size + x) * 3 + c] = static_cast<uint8_t>(acc >> (2 * kInterBits));
      }
    }
  }
}

void normalize(const uint8_t *crop, int size, const std::array<float, 3> &mean, const std::array<float, 3> &std,
               float *out) {
  const size_t plane = static_cast<size_t>(size) * size;
  for (size_t i = 0; i < plane; ++i)
    for (int c = 0; c < 3; ++c) {
      const float v = static_cast<float>(crop[i * 3 + c]) / 255.0f;
      out[c * plane + i] = (v - mean[c]) / std[c];
    }
}

}  // namespace locllm
