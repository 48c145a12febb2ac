// Reading a run's metrics.jsonl back in tests: the values logged under one key, in order.
#pragma once
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace tl {

inline std::vector<double> logged_values(const std::filesystem::path& metrics, const char* key) {
  std::vector<double> out;
  std::ifstream in(metrics);
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains(key)) out.push_back(j[key].get<double>());
  }
  return out;
}

}  // namespace tl
