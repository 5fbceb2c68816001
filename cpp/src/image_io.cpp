// Image files -> RGB: JPEG (libjpeg-turbo, the decoder OpenCV uses, default settings: ISLOW IDCT,
// fancy upsampling) and PNG (libpng). A file libjpeg decodes only with a warning (truncated or
// damaged data) is refused, as crop.load_image refuses what OpenCV would decode silently grey.
#include <sys/stat.h>

#include <csetjmp>
#include <cstdio>  // before jpeglib.h, which uses FILE and size_t
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>

#include <jpeglib.h>
#include <png.h>

#include "core.hpp"

namespace locllm {
namespace {

void check_size(const std::string &path, long long width, long long height) {
  if (width < kMinImageSide || height < kMinImageSide)
    fail(LOCLLM_IMAGE_ERROR, path + ": the image is " + std::to_string(width) + "x" + std::to_string(height) +
                                 " pixels, smaller than 2x2");
  if (width * height > kMaxImagePixels)
    fail(LOCLLM_IMAGE_ERROR, path + ": the image is " + std::to_string(width) + "x" + std::to_string(height) + " = " +
                                 std::to_string(width * height) + " pixels, over the limit of 89478485");
}

struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_fatal(j_common_ptr cinfo) {
  auto *err = reinterpret_cast<JpegError *>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

void jpeg_message(j_common_ptr cinfo, int level) {
  if (level < 0) jpeg_fatal(cinfo);  // a warning: corrupt or truncated data
}

// EXIF orientation (APP1 "Exif\0\0", TIFF tag 0x0112); 1 when absent.
int exif_orientation(const std::vector<uint8_t> &data) {
  size_t pos = 2;
  while (pos + 4 <= data.size() && data[pos] == 0xFF) {
    const int marker = data[pos + 1];
    const size_t len = (static_cast<size_t>(data[pos + 2]) << 8) | data[pos + 3];
    if (marker == 0xDA || marker == 0xD9 || len < 2) break;
    const size_t body = pos + 4, end = pos + 2 + len;
    if (end > data.size()) break;
    if (marker == 0xE1 && len >= 16 && std::memcmp(&data[body], "Exif\0\0", 6) == 0) {
      const uint8_t *t = &data[body + 6];
      const size_t n = end - body - 6;
      const bool le = t[0] == 'I';
      auto u16 = [&](size_t o) -> unsigned { return o + 2 > n ? 0 : le ? t[o] | t[o + 1] << 8 : t[o] << 8 | t[o + 1]; };
      auto u32 = [&](size_t o) -> size_t {
        return o + 4 > n ? 0 : le ? (u16(o) | static_cast<size_t>(u16(o + 2)) << 16) : (static_cast<size_t>(u16(o)) << 16 | u16(o + 2));
      };
      const size_t ifd = u32(4);
      const unsigned count = u16(ifd);
      for (unsigned i = 0; i < count; ++i) {
        const size_t e = ifd + 2 + 12 * static_cast<size_t>(i);
        if (e + 12 > n) break;
        if (u16(e) == 0x0112) return static_cast<int>(u16(e + 8));
      }
      return 1;
    }
    pos = end;
  }
  return 1;
}

// The EXIF orientation applied as cv2.imread does (orientations 2-8: flips and rotations).
Image orient(const Image &in, int orientation) {
  if (orientation < 2 || orientation > 8) return in;
  const bool swap = orientation >= 5;
  Image out;
  out.width = swap ? in.height : in.width;
  out.height = swap ? in.width : in.height;
  out.rgb.resize(in.rgb.size());
  for (int y = 0; y < out.height; ++y)
    for (int x = 0; x < out.width; ++x) {
      int sx = x, sy = y;  // the source pixel shown at (x, y)
      switch (orientation) {
        case 2: sx = in.width - 1 - x; break;
        case 3: sx = in.width - 1 - x; sy = in.height - 1 - y; break;
        case 4: sy = in.height - 1 - y; break;
        case 5: sx = y; sy = x; break;
        case 6: sx = y; sy = in.height - 1 - x; break;
        case 7: sx = in.width - 1 - y; sy = in.height - 1 - x; break;
        case 8: sx = in.width - 1 - y; sy = x; break;
      }
      std::memcpy(&out.rgb[(static_cast<size_t>(y) * out.width + x) * 3],
                  &in.rgb[(static_cast<size_t>(sy) * in.width + sx) * 3], 3);
    }
  return out;
}

struct JpegDecode {  // plain data: written through a pointer, valid after a longjmp
  uint8_t *pixels = nullptr;
  long long width = 0, height = 0;
  bool size_refused = false;
  char message[JMSG_LENGTH_MAX] = {};
};

// libjpeg reports errors by longjmp: no C++ object lives in this function's frame.
void decode_jpeg(const std::vector<uint8_t> &data, JpegDecode *out) {
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_fatal;
  err.mgr.emit_message = jpeg_message;
  if (setjmp(err.jump)) {
    std::memcpy(out->message, err.message, sizeof out->message);
    std::free(out->pixels);
    out->pixels = nullptr;
    jpeg_destroy_decompress(&cinfo);
    return;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data.data(), static_cast<unsigned long>(data.size()));
  jpeg_read_header(&cinfo, TRUE);
  out->width = cinfo.image_width;
  out->height = cinfo.image_height;
  if (out->width < kMinImageSide || out->height < kMinImageSide || out->width * out->height > kMaxImagePixels) {
    out->size_refused = true;  // before decoding
    jpeg_destroy_decompress(&cinfo);
    return;
  }
  cinfo.out_color_space = JCS_RGB;
  jpeg_start_decompress(&cinfo);
  out->width = cinfo.output_width;
  out->height = cinfo.output_height;
  const size_t row_bytes = static_cast<size_t>(cinfo.output_width) * 3;
  out->pixels = static_cast<uint8_t *>(std::malloc(row_bytes * cinfo.output_height));
  if (!out->pixels) {
    std::strcpy(out->message, "out of memory");
    jpeg_destroy_decompress(&cinfo);
    return;
  }
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = out->pixels + static_cast<size_t>(cinfo.output_scanline) * row_bytes;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
}

Image load_jpeg(const std::string &path, const std::vector<uint8_t> &data) {
  JpegDecode d;
  decode_jpeg(data, &d);
  if (d.size_refused) check_size(path, d.width, d.height);
  if (!d.pixels) fail(LOCLLM_IMAGE_ERROR, path + ": damaged JPEG file: " + d.message);
  Image img;
  img.width = static_cast<int>(d.width);
  img.height = static_cast<int>(d.height);
  img.rgb.assign(d.pixels, d.pixels + static_cast<size_t>(d.width) * d.height * 3);
  std::free(d.pixels);
  return img;
}

Image load_png(const std::string &path, const std::vector<uint8_t> &data) {
  png_image png;
  std::memset(&png, 0, sizeof png);
  png.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&png, data.data(), data.size()))
    fail(LOCLLM_IMAGE_ERROR, path + ": damaged PNG file: " + png.message);
  try {
    check_size(path, png.width, png.height);
  } catch (...) {
    png_image_free(&png);
    throw;
  }
  png.format = PNG_FORMAT_RGBA;  // alpha dropped below, not composited (as cv2.imread)
  std::vector<uint8_t> rgba(PNG_IMAGE_SIZE(png));
  if (!png_image_finish_read(&png, nullptr, rgba.data(), 0, nullptr))
    fail(LOCLLM_IMAGE_ERROR, path + ": damaged PNG file: " + png.message);
  if (png.warning_or_error) {
    const std::string message = png.message;
    png_image_free(&png);
    fail(LOCLLM_IMAGE_ERROR, path + ": damaged PNG file: " + message);
  }
  Image img;
  img.width = static_cast<int>(png.width);
  img.height = static_cast<int>(png.height);
  img.rgb.resize(static_cast<size_t>(img.width) * img.height * 3);
  for (size_t i = 0, n = static_cast<size_t>(img.width) * img.height; i < n; ++i)
    std::memcpy(&img.rgb[i * 3], &rgba[i * 4], 3);
  return img;
}

}  // namespace

Image load_image(const std::string &path) {
  if (path.empty()) fail(LOCLLM_IMAGE_ERROR, "the image path is empty");
  if (path.find("://") != std::string::npos)
    fail(LOCLLM_IMAGE_ERROR, path + ": URLs are not read, only local files (download the image first)");
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) fail(LOCLLM_IMAGE_ERROR, "image file not found: " + path);
  if (S_ISDIR(st.st_mode)) fail(LOCLLM_IMAGE_ERROR, path + ": is a directory, not an image file");
  if (!S_ISREG(st.st_mode)) fail(LOCLLM_IMAGE_ERROR, path + ": is not a regular file");
  std::ifstream in(path, std::ios::binary);
  std::vector<uint8_t> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in.good() && !in.eof()) fail(LOCLLM_IMAGE_ERROR, path + ": cannot read the file");
  if (data.empty()) fail(LOCLLM_IMAGE_ERROR, path + ": the file is empty");
  if (data.size() >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF)
    return orient(load_jpeg(path, data), exif_orientation(data));
  if (data.size() >= 8 && std::memcmp(data.data(), "\x89PNG\r\n\x1a\n", 8) == 0) return load_png(path, data);
  fail(LOCLLM_IMAGE_ERROR, path + ": cannot decode: not a JPEG or PNG file (the C++ runtime reads those two)");
}

}  // namespace locllm
