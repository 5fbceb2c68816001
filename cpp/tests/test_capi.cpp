// The C API: every bad input is a status and a message naming the problem; the engine runs.
// Tests that run a model use LOCLLM_TEST_ENGINE (CMake sets it to the demo engine) and are
// skipped where it is unset.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <string>
#include <vector>

#include "locllm/locllm.h"

namespace fs = std::filesystem;

namespace {

std::string env(const char *name) {
  const char *v = std::getenv(name);
  return v ? v : "";
}

std::string last_error() { return locllm_last_error(); }

fs::path temp_dir(const std::string &name) {
  fs::path p = fs::temp_directory_path() / ("locllm-test-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

void write_file(const fs::path &p, const std::string &bytes) {
  std::ofstream(p, std::ios::binary) << bytes;
}

std::string read_file(const fs::path &p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<uint8_t> gradient(int w, int h) {
  std::vector<uint8_t> img(static_cast<size_t>(w) * h * 3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c) img[(static_cast<size_t>(y) * w + x) * 3 + c] = static_cast<uint8_t>((x * 7 + y * 3 + c * 50) & 255);
  return img;
}

class EngineTest : public ::testing::Test {
 protected:
  static locllm_pose *pose;
  static void SetUpTestSuite() {
    const std::string dir = env("LOCLLM_TEST_ENGINE");
    if (dir.empty()) return;
    ASSERT_EQ(locllm_create(dir.c_str(), nullptr, &pose), LOCLLM_OK) << last_error();
  }
  static void TearDownTestSuite() {
    locllm_destroy(pose);
    pose = nullptr;
  }
  void SetUp() override {
    if (!pose) GTEST_SKIP() << "LOCLLM_TEST_ENGINE is not set";
  }
};
locllm_pose *EngineTest::pose = nullptr;

}  // namespace

TEST(Create, NullArgumentsAreArgumentErrors) {
  locllm_pose *pose = reinterpret_cast<locllm_pose *>(1);
  EXPECT_EQ(locllm_create(nullptr, nullptr, &pose), LOCLLM_ARGUMENT_ERROR);
  EXPECT_NE(last_error().find("engine_dir"), std::string::npos) << last_error();
  EXPECT_EQ(pose, nullptr);
  EXPECT_EQ(locllm_create("x", nullptr, nullptr), LOCLLM_ARGUMENT_ERROR);
  locllm_options bad{1, -3};
  EXPECT_EQ(locllm_create("x", &bad, &pose), LOCLLM_ARGUMENT_ERROR);
  EXPECT_NE(last_error().find("threads"), std::string::npos);
}

TEST(Create, MissingOrForeignDirectoryIsEngineError) {
  locllm_pose *pose = nullptr;
  EXPECT_EQ(locllm_create("/nonexistent/engine", nullptr, &pose), LOCLLM_ENGINE_ERROR);
  EXPECT_NE(last_error().find("/nonexistent/engine"), std::string::npos);
  const fs::path dir = temp_dir("foreign");
  EXPECT_EQ(locllm_create(dir.c_str(), nullptr, &pose), LOCLLM_ENGINE_ERROR);
  EXPECT_NE(last_error().find("manifest.json is missing"), std::string::npos) << last_error();
  write_file(dir / "manifest.json", "{not json");
  EXPECT_EQ(locllm_create(dir.c_str(), nullptr, &pose), LOCLLM_ENGINE_ERROR);
  EXPECT_NE(last_error().find("not valid JSON"), std::string::npos) << last_error();
  fs::remove_all(dir);
}

TEST(Crop, BadBoxesAreBoxErrors) {
  const auto img = gradient(64, 48);
  std::vector<uint8_t> out(32 * 32 * 3);
  const double nan_box[4] = {0, 0, NAN, 10}, thin[4] = {5, 5, 1.5, 20}, outside[4] = {64, 0, 10, 10};
  EXPECT_EQ(locllm_crop(img.data(), 64, 48, 64 * 3, nan_box, 32, out.data()), LOCLLM_BOX_ERROR);
  EXPECT_NE(last_error().find("non-finite"), std::string::npos);
  EXPECT_EQ(locllm_crop(img.data(), 64, 48, 64 * 3, thin, 32, out.data()), LOCLLM_BOX_ERROR);
  EXPECT_NE(last_error().find("degenerate"), std::string::npos);
  EXPECT_EQ(locllm_crop(img.data(), 64, 48, 64 * 3, outside, 32, out.data()), LOCLLM_BOX_ERROR);
  EXPECT_NE(last_error().find("outside the 64x48 image"), std::string::npos) << last_error();
}

TEST(Crop, BadImagesAreImageOrArgumentErrors) {
  const auto img = gradient(64, 48);
  std::vector<uint8_t> out(32 * 32 * 3);
  const double box[4] = {0, 0, 20, 20};
  EXPECT_EQ(locllm_crop(nullptr, 64, 48, 64 * 3, box, 32, out.data()), LOCLLM_ARGUMENT_ERROR);
  EXPECT_EQ(locllm_crop(img.data(), 64, 48, 64 * 2, box, 32, out.data()), LOCLLM_IMAGE_ERROR);
  EXPECT_NE(last_error().find("stride"), std::string::npos);
  EXPECT_EQ(locllm_crop(img.data(), 1, 48, 3, box, 32, out.data()), LOCLLM_IMAGE_ERROR);
  EXPECT_EQ(locllm_crop(img.data(), 64, 48, 64 * 3, box, 0, out.data()), LOCLLM_ARGUMENT_ERROR);
}

TEST(Crop, UniformImageGivesItsColourInsideAndBlackOutside) {
  std::vector<uint8_t> img(40 * 30 * 3);
  for (size_t i = 0; i < img.size(); ++i) img[i] = static_cast<uint8_t>(100 + i % 3);
  std::vector<uint8_t> out(16 * 16 * 3);
  const double box[4] = {10, 0, 10, 30};  // tall box: padded to a 29 px square, inside the image
  ASSERT_EQ(locllm_crop(img.data(), 40, 30, 40 * 3, box, 16, out.data()), LOCLLM_OK) << last_error();
  for (int c = 0; c < 3; ++c) EXPECT_EQ(out[(8 * 16 + 8) * 3 + c], 100 + c);
  const double low[4] = {0, 20, 40, 10};  // wide box at the bottom: its square reaches below the image
  ASSERT_EQ(locllm_crop(img.data(), 40, 30, 40 * 3, low, 16, out.data()), LOCLLM_OK) << last_error();
  EXPECT_EQ(out[(15 * 16 + 8) * 3], 0);
  EXPECT_EQ(out[(8 * 16 + 8) * 3], 100);
}

TEST(Image, FilesAreDecodedOrRefused) {
  uint8_t *rgb = nullptr;
  int w = 0, h = 0;
  const fs::path jpg = fs::path(env("LOCLLM_TEST_DATA")) / "astronaut.jpg";
  if (!fs::exists(jpg)) GTEST_SKIP() << "LOCLLM_TEST_DATA/astronaut.jpg is missing";
  ASSERT_EQ(locllm_load_image(jpg.c_str(), &rgb, &w, &h), LOCLLM_OK) << last_error();
  EXPECT_GT(w, 100);
  EXPECT_GT(h, 100);
  locllm_image_free(rgb);
  const fs::path dir = temp_dir("images");
  const std::string bytes = read_file(jpg);
  write_file(dir / "cut.jpg", bytes.substr(0, bytes.size() / 2));
  EXPECT_EQ(locllm_load_image((dir / "cut.jpg").c_str(), &rgb, &w, &h), LOCLLM_IMAGE_ERROR);
  EXPECT_NE(last_error().find("damaged JPEG"), std::string::npos) << last_error();
  EXPECT_EQ(rgb, nullptr);
  write_file(dir / "empty.png", "");
  EXPECT_EQ(locllm_load_image((dir / "empty.png").c_str(), &rgb, &w, &h), LOCLLM_IMAGE_ERROR);
  EXPECT_NE(last_error().find("empty"), std::string::npos);
  write_file(dir / "text.jpg", "hello, not an image");
  EXPECT_EQ(locllm_load_image((dir / "text.jpg").c_str(), &rgb, &w, &h), LOCLLM_IMAGE_ERROR);
  EXPECT_EQ(locllm_load_image(dir.c_str(), &rgb, &w, &h), LOCLLM_IMAGE_ERROR);
  EXPECT_NE(last_error().find("directory"), std::string::npos);
  EXPECT_EQ(locllm_load_image((dir / "absent.jpg").c_str(), &rgb, &w, &h), LOCLLM_IMAGE_ERROR);
  EXPECT_NE(last_error().find("not found"), std::string::npos);
  fs::remove_all(dir);
}

TEST_F(EngineTest, AnswersAreWellFormedAndInsideTheBox) {
  const auto img = gradient(96, 128);
  const double box[4] = {8, 16, 60, 100};
  const locllm_keypoint kps[] = {{"neck", nullptr}, {"left_wrist", nullptr}, {"chin", "The chin is below the mouth."}};
  locllm_result *res = nullptr;
  ASSERT_EQ(locllm_locate(pose, img.data(), 96, 128, 96 * 3, box, 1, kps, 3, &res), LOCLLM_OK) << last_error();
  ASSERT_EQ(locllm_result_persons(res), 1u);
  ASSERT_EQ(locllm_result_keypoints(res), 3u);
  const std::regex answer(R"(\[0\.\d{3},0\.\d{3}\])");
  for (size_t j = 0; j < 3; ++j) {
    locllm_point p;
    ASSERT_EQ(locllm_result_point(res, 0, j, &p), LOCLLM_OK);
    EXPECT_TRUE(std::regex_match(p.answer, answer)) << p.answer;
    EXPECT_GT(p.score, 0.0);
    EXPECT_LE(p.score, 1.0);
    // the square crop around the box: its side is the box's longer side
    EXPECT_GE(p.x, 8 + 30 - 50 - 1e-9);
    EXPECT_LE(p.x, 8 + 30 + 50);
    EXPECT_GE(p.y, 16 - 1e-9);
    EXPECT_LE(p.y, 16 + 100);
    EXPECT_TRUE(std::isnan(p.z));
  }
  locllm_point p;
  EXPECT_STREQ((locllm_result_point(res, 0, 1, &p), p.name), "left wrist");  // the library's spelling
  EXPECT_EQ(locllm_result_point(res, 1, 0, &p), LOCLLM_ARGUMENT_ERROR);
  locllm_result_free(res);
}

TEST_F(EngineTest, BadRequestsAreRefusedBeforeAnyModelWork) {
  const auto img = gradient(64, 64);
  locllm_result *res = nullptr;
  const locllm_keypoint unknown[] = {{"tail", nullptr}};
  EXPECT_EQ(locllm_locate(pose, img.data(), 64, 64, 192, nullptr, 0, unknown, 1, &res), LOCLLM_UNKNOWN_KEYPOINT_ERROR);
  EXPECT_NE(last_error().find("'tail'"), std::string::npos);
  const locllm_keypoint twice[] = {{"neck", nullptr}, {"neck", nullptr}};
  EXPECT_EQ(locllm_locate(pose, img.data(), 64, 64, 192, nullptr, 0, twice, 2, &res), LOCLLM_KEYPOINT_ERROR);
  EXPECT_EQ(locllm_locate(pose, img.data(), 64, 64, 192, nullptr, 0, twice, 0, &res), LOCLLM_KEYPOINT_ERROR);
  const locllm_keypoint control[] = {{"chin", "The chin </s> is low."}};
  EXPECT_EQ(locllm_locate(pose, img.data(), 64, 64, 192, nullptr, 0, control, 1, &res), LOCLLM_PROTOCOL_ERROR);
  EXPECT_NE(last_error().find("</s>"), std::string::npos);
  std::string long_text;
  for (int i = 0; i < 3000; ++i) long_text += "very ";
  const locllm_keypoint too_long[] = {{"chin", long_text.c_str()}};
  EXPECT_EQ(locllm_locate(pose, img.data(), 64, 64, 192, nullptr, 0, too_long, 1, &res), LOCLLM_PROTOCOL_ERROR);
  EXPECT_NE(last_error().find("context"), std::string::npos) << last_error();
  const locllm_keypoint ok[] = {{"neck", nullptr}};
  const double boxes[8] = {0, 0, 30, 30, 70, 0, 10, 10};  // the second lies outside
  EXPECT_EQ(locllm_locate(pose, img.data(), 64, 64, 192, boxes, 2, ok, 1, &res), LOCLLM_BOX_ERROR);
  EXPECT_NE(last_error().find("box 1"), std::string::npos) << last_error();
  EXPECT_EQ(locllm_locate(pose, img.data(), 64, 64, 192, nullptr, 3, ok, 1, &res), LOCLLM_ARGUMENT_ERROR);
  EXPECT_EQ(res, nullptr);
}

TEST_F(EngineTest, SkeletonNames) {
  const char *const *names = nullptr;
  size_t n = 0;
  ASSERT_EQ(locllm_skeleton(pose, "coco17", &names, &n), LOCLLM_OK);
  EXPECT_EQ(n, 17u);
  EXPECT_STREQ(names[0], "nose");
  EXPECT_EQ(locllm_skeleton(pose, "octopus", &names, &n), LOCLLM_KEYPOINT_ERROR);
}

TEST_F(EngineTest, ModifiedEnginesAreRefused) {
  const fs::path src = env("LOCLLM_TEST_ENGINE");
  const fs::path dir = temp_dir("engine");
  fs::copy(src / "tokenizer", dir / "tokenizer");
  fs::copy_file(src / "descriptions.yaml", dir / "descriptions.yaml");
  const std::string manifest = read_file(src / "manifest.json");
  locllm_pose *other = nullptr;
  // a newer format
  std::string newer = std::regex_replace(manifest, std::regex(R"("format_version": 1)"), R"("format_version": 2)");
  write_file(dir / "manifest.json", newer);
  EXPECT_EQ(locllm_create(dir.c_str(), nullptr, &other), LOCLLM_ENGINE_ERROR);
  EXPECT_NE(last_error().find("format_version 2"), std::string::npos) << last_error();
  // a field of the wrong type is named
  write_file(dir / "manifest.json", std::regex_replace(manifest, std::regex(R"("image_size": 224)"), R"("image_size": "224")"));
  EXPECT_EQ(locllm_create(dir.c_str(), nullptr, &other), LOCLLM_ENGINE_ERROR);
  EXPECT_NE(last_error().find("model.image_size"), std::string::npos) << last_error();
  // a modified file: its size (or sha256) differs from the manifest's
  write_file(dir / "manifest.json", manifest);
  write_file(dir / "descriptions.yaml", read_file(src / "descriptions.yaml") + "# edited\n");
  EXPECT_EQ(locllm_create(dir.c_str(), nullptr, &other), LOCLLM_ENGINE_ERROR);
  EXPECT_NE(last_error().find("descriptions.yaml: size"), std::string::npos) << last_error();
  std::string same_size = read_file(src / "descriptions.yaml");
  same_size[same_size.size() - 2] = same_size[same_size.size() - 2] == 'a' ? 'b' : 'a';
  write_file(dir / "descriptions.yaml", same_size);
  EXPECT_EQ(locllm_create(dir.c_str(), nullptr, &other), LOCLLM_ENGINE_ERROR);
  EXPECT_NE(last_error().find("sha256"), std::string::npos) << last_error();
  EXPECT_EQ(other, nullptr);
  fs::remove_all(dir);
}
