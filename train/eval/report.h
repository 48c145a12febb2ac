// The heal report: what a heal changed, written into the run's output_dir at the end of
// training (and by `torchless-eval --report` for any checkpoint).
//   report.md       each measure before and after, generations side by side, the plots
//   report.json     the same numbers
//   loss.png        training loss and validation loss against the step (from metrics.jsonl)
//   generation.png  loop fraction and seq-rep-4 of the greedy generations against the step
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include "train/eval/evaluate.h"

namespace tl {

struct SideBySide {
  std::string prompt, before, after;
};

struct HealReport {
  std::string title;
  std::string before_label = "before", after_label = "after";
  EvalMeasures before, after;
  std::vector<SideBySide> samples;
};

// Writes the files above into `dir` (each atomically); the plots only when `metrics_jsonl`
// exists and holds the records they need. Returns the PNG files written.
std::vector<std::filesystem::path> write_heal_report(const std::filesystem::path& dir, const HealReport& report,
                                                     const std::filesystem::path& metrics_jsonl);

}  // namespace tl
