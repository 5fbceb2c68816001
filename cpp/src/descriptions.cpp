// descriptions.py in C++: the engine's keypoint description library and request resolution.
#include <yaml-cpp/yaml.h>

#include <set>

#include "core.hpp"

namespace locllm {
namespace {

bool blank(const std::string &s) { return s.find_first_not_of(" \t\r\n\v\f") == std::string::npos; }

std::string replaced(std::string s, char from, char to) {
  for (char &c : s)
    if (c == from) c = to;
  return s;
}

}  // namespace

DescriptionLibrary DescriptionLibrary::load(const std::string &path) {
  YAML::Node data;
  try {
    data = YAML::LoadFile(path);
  } catch (const YAML::Exception &e) {
    fail(LOCLLM_ENGINE_ERROR, path + ": cannot read the keypoint description library: " + e.what());
  }
  if (!data.IsMap() || !data["keypoints"] || !data["keypoints"].IsMap())
    fail(LOCLLM_ENGINE_ERROR, path + ": not a keypoint description library (no 'keypoints' mapping)");
  DescriptionLibrary lib;
  try {
    for (const auto &kv : data["keypoints"]) {
      const std::string name = kv.first.as<std::string>();
      const YAML::Node text = kv.second.IsMap() ? kv.second["description"] : YAML::Node();
      if (!text || !text.IsScalar() || blank(text.as<std::string>()))
        fail(LOCLLM_ENGINE_ERROR, path + ": keypoints." + name + ": needs a 'description' string");
      lib.descriptions[name] = text.as<std::string>();
    }
    if (data["skeletons"] && !data["skeletons"].IsNull()) {
      if (!data["skeletons"].IsMap()) fail(LOCLLM_ENGINE_ERROR, path + ": 'skeletons' must be a mapping");
      for (const auto &kv : data["skeletons"]) {
        const std::string name = kv.first.as<std::string>();
        const YAML::Node kps = kv.second.IsMap() ? kv.second["keypoints"] : YAML::Node();
        if (!kps || !kps.IsSequence())
          fail(LOCLLM_ENGINE_ERROR, path + ": skeletons." + name + ": needs a 'keypoints' list");
        for (const auto &k : kps) lib.skeletons[name].push_back(k.as<std::string>());
      }
    }
  } catch (const YAML::Exception &e) {
    fail(LOCLLM_ENGINE_ERROR, path + ": malformed keypoint description library: " + e.what());
  }
  return lib;
}

std::vector<KeypointRequest> DescriptionLibrary::resolve(const locllm_keypoint *keypoints, size_t n) const {
  if (n == 0) fail(LOCLLM_KEYPOINT_ERROR, "no keypoints requested: pass at least one keypoint name");
  if (!keypoints) fail(LOCLLM_ARGUMENT_ERROR, "keypoints is NULL with a count of " + std::to_string(n));
  std::vector<KeypointRequest> out;
  std::set<std::string> seen;
  for (size_t i = 0; i < n; ++i) {
    if (!keypoints[i].name || blank(keypoints[i].name))
      fail(LOCLLM_KEYPOINT_ERROR, "keypoint " + std::to_string(i) + ": names must be non-empty strings");
    std::string name = keypoints[i].name, description;
    if (!keypoints[i].description) {
      std::string canonical;  // the library's spelling: itself, or with underscores and spaces swapped
      for (const std::string &cand : {name, replaced(name, '_', ' '), replaced(name, ' ', '_')})
        if (descriptions.count(cand)) {
          canonical = cand;
          break;
        }
      if (canonical.empty()) {
        std::string known;
        for (const auto &kv : descriptions) known += (known.empty() ? "" : ", ") + kv.first;
        fail(LOCLLM_UNKNOWN_KEYPOINT_ERROR, "unknown keypoint '" + name +
                                                "': it is not in the description library and no description was "
                                                "given. Give it a description, or use one of: " + known);
      }
      name = canonical;
      description = descriptions.at(canonical);
    } else {
      description = keypoints[i].description;
      if (blank(description)) fail(LOCLLM_KEYPOINT_ERROR, "the description of '" + name + "' must be a non-empty string");
    }
    check_user_text(name, "keypoint name '" + name + "'");
    check_user_text(description, "the description of '" + name + "'");
    if (!seen.insert(name).second) fail(LOCLLM_KEYPOINT_ERROR, "keypoint '" + name + "' requested twice");
    out.push_back({name, description});
  }
  return out;
}

}  // namespace locllm
