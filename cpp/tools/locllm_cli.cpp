// locllm_cpp: `locllm locate` on images, through the C API.
//
//   locllm_cpp locate IMAGE -m ENGINE_DIR [-k neck -k pelvis | --skeleton coco17] [--box x,y,w,h ...]
//              [--box-format xywh|xyxy|cxcywh] [--threads N] [--no-verify] [--json] [--timing]
//
// A problem with the input is one line on stderr and exit status 2 (3 for an internal error).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "locllm/locllm.h"

namespace {

const char *kUsage =
    "usage: locllm_cpp locate IMAGE -m ENGINE_DIR [-k KEYPOINT ...] [--skeleton coco17] [--box x,y,w,h ...]\n"
    "                  [--box-format xywh|xyxy|cxcywh] [--threads N] [--no-verify] [--json] [--timing]\n";

int usage_error(const std::string &message) {
  std::fprintf(stderr, "locllm_cpp: error: %s (see locllm_cpp --help)\n", message.c_str());
  return 2;
}

int api_error(locllm_status status) {
  std::fprintf(stderr, "locllm_cpp: error: %s: %s\n", locllm_status_name(status), locllm_last_error());
  return status == LOCLLM_INTERNAL_ERROR ? 3 : 2;
}

bool parse_box(const std::string &text, const std::string &format, std::vector<double> &out) {
  double v[4];
  size_t pos = 0;
  for (int i = 0; i < 4; ++i) {
    const size_t end = i < 3 ? text.find(',', pos) : text.size();
    if (end == std::string::npos) return false;
    const std::string item = text.substr(pos, end - pos);
    char *stop = nullptr;
    v[i] = std::strtod(item.c_str(), &stop);
    if (item.empty() || *stop != '\0') return false;
    pos = end + 1;
  }
  if (format == "xyxy") {  // inputs.to_xywh
    v[2] -= v[0];
    v[3] -= v[1];
  } else if (format == "cxcywh") {
    v[0] -= v[2] / 2;
    v[1] -= v[3] / 2;
  }
  out.insert(out.end(), v, v + 4);
  return true;
}

std::string json_string(const char *s) {
  std::string out = "\"";
  for (const char *p = s; *p; ++p) {
    const unsigned char c = static_cast<unsigned char>(*p);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += *p;
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += *p;
    }
  }
  return out + "\"";
}

std::string num(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

}  // namespace

int main(int argc, char **argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "-h" || args[0] == "--help") {
    std::fputs(kUsage, args.empty() ? stderr : stdout);
    return args.empty() ? 2 : 0;
  }
  if (args[0] != "locate") return usage_error("unknown command '" + args[0] + "' (the C++ CLI has: locate)");
  std::string image, engine, skeleton = "coco17", box_format = "xywh";
  std::vector<std::string> keypoints, box_texts;
  int threads = 0;
  bool verify = true, json = false, timing = false;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string &a = args[i];
    auto value = [&](std::string &dst) {
      if (i + 1 >= args.size()) return false;
      dst = args[++i];
      return true;
    };
    std::string v;
    if (a == "-m" || a == "--model") {
      if (!value(engine)) return usage_error(a + " needs an engine directory");
    } else if (a == "-k" || a == "--keypoint") {
      if (!value(v)) return usage_error(a + " needs a keypoint name");
      keypoints.push_back(v);
    } else if (a == "--skeleton") {
      if (!value(skeleton)) return usage_error("--skeleton needs a name");
    } else if (a == "--box") {
      if (!value(v)) return usage_error("--box needs x,y,w,h");
      box_texts.push_back(v);
    } else if (a == "--box-format") {
      if (!value(box_format) || (box_format != "xywh" && box_format != "xyxy" && box_format != "cxcywh"))
        return usage_error("--box-format must be xywh, xyxy or cxcywh");
    } else if (a == "--threads") {
      char *stop = nullptr;
      if (!value(v) || (threads = static_cast<int>(std::strtol(v.c_str(), &stop, 10)), *stop != '\0') || threads < 0)
        return usage_error("--threads needs a number >= 0");
    } else if (a == "--no-verify") {
      verify = false;
    } else if (a == "--json") {
      json = true;
    } else if (a == "--timing") {
      timing = true;
    } else if (!a.empty() && a[0] == '-') {
      return usage_error("unknown option '" + a + "'");
    } else if (image.empty()) {
      image = a;
    } else {
      return usage_error("unexpected argument '" + a + "'");
    }
  }
  if (image.empty()) return usage_error("locate needs an IMAGE");
  if (engine.empty()) return usage_error("locate needs -m ENGINE_DIR (an engine directory)");
  std::vector<double> boxes;
  for (const auto &b : box_texts)
    if (!parse_box(b, box_format, boxes)) return usage_error("box must be x,y,w,h (4 numbers), got '" + b + "'");

  uint8_t *rgb = nullptr;
  int width = 0, height = 0;
  locllm_status st = locllm_load_image(image.c_str(), &rgb, &width, &height);
  if (st != LOCLLM_OK) return api_error(st);
  const auto t0 = std::chrono::steady_clock::now();
  locllm_options options;
  locllm_default_options(&options);
  options.verify = verify;
  options.threads = threads;
  locllm_pose *pose = nullptr;
  st = locllm_create(engine.c_str(), &options, &pose);
  if (st != LOCLLM_OK) {
    locllm_image_free(rgb);
    return api_error(st);
  }
  const auto t1 = std::chrono::steady_clock::now();
  std::vector<locllm_keypoint> requests;
  if (keypoints.empty()) {
    const char *const *names = nullptr;
    size_t count = 0;
    st = locllm_skeleton(pose, skeleton.c_str(), &names, &count);
    for (size_t i = 0; st == LOCLLM_OK && i < count; ++i) requests.push_back({names[i], nullptr});
  }
  for (const auto &k : keypoints) requests.push_back({k.c_str(), nullptr});
  locllm_result *res = nullptr;
  if (st == LOCLLM_OK)
    st = locllm_locate(pose, rgb, width, height, static_cast<size_t>(width) * 3, boxes.empty() ? nullptr : boxes.data(),
                       boxes.size() / 4, requests.data(), requests.size(), &res);
  const auto t2 = std::chrono::steady_clock::now();
  locllm_image_free(rgb);
  if (st != LOCLLM_OK) {
    locllm_destroy(pose);
    return api_error(st);
  }
  const bool three_d = locllm_coord_dims(pose) == 3;
  const size_t persons = locllm_result_persons(res), k = locllm_result_keypoints(res);
  if (json) {
    std::printf("{\"image_size\": [%d, %d], \"persons\": [", height, width);
    for (size_t p = 0; p < persons; ++p) {
      double box[4];
      locllm_result_box(res, p, box);
      std::string kps;
      double score_sum = 0;
      for (size_t j = 0; j < k; ++j) {
        locllm_point pt;
        locllm_result_point(res, p, j, &pt);
        score_sum += pt.score;
        kps += std::string(j ? ", " : "") + "{\"name\": " + json_string(pt.name) + ", \"x\": " + num(pt.x) +
               ", \"y\": " + num(pt.y) + ", \"score\": " + num(pt.score) + ", \"answer\": " + json_string(pt.answer) +
               (three_d ? ", \"z\": " + num(pt.z) : "") + "}";
      }
      std::printf("%s{\"box\": [%s, %s, %s, %s], \"score\": %s, \"keypoints\": [%s]}", p ? ", " : "", num(box[0]).c_str(),
                  num(box[1]).c_str(), num(box[2]).c_str(), num(box[3]).c_str(),
                  num(score_sum / static_cast<double>(k)).c_str(), kps.c_str());
    }
    std::printf("]}\n");
  } else {
    for (size_t p = 0; p < persons; ++p) {
      double box[4];
      locllm_result_box(res, p, box);
      std::printf("person %zu  box=[%.1f, %.1f, %.1f, %.1f]\n", p, box[0], box[1], box[2], box[3]);
      std::printf("  %-16s%9s%9s%s%8s  answer\n", "keypoint", "x", "y", three_d ? "    z (mm)" : "", "score");
      for (size_t j = 0; j < k; ++j) {
        locllm_point pt;
        locllm_result_point(res, p, j, &pt);
        std::printf("  %-16s%9.1f%9.1f", pt.name, pt.x, pt.y);
        if (three_d) std::printf("%10.1f", pt.z);
        std::printf("%8.3f  %s\n", pt.score, pt.answer);
      }
    }
  }
  if (timing)
    std::fprintf(stderr, "locllm_cpp: start-up %.1f ms, locate %.1f ms\n",
                 std::chrono::duration<double, std::milli>(t1 - t0).count(),
                 std::chrono::duration<double, std::milli>(t2 - t1).count());
  locllm_result_free(res);
  locllm_destroy(pose);
  return 0;
}
