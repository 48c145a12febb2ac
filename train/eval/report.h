// The heal report: what a heal changed, written into the run's output_dir at the end of
// training (and by `torchless-eval --report` for any checkpoint).
//   report.md       each measure before and after (and for the parent, when one is known:
//                   then also the recovered fraction of the damage), generations side by
//                   side, the plots
//   report.json     the same numbers
//   loss.png        training loss and validation loss against the step (from metrics.jsonl),
//                   with the parent's held-out loss as a level line
//   generation.png  loop fraction and seq-rep-4 of the greedy generations against the step
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include "train/eval/evaluate.h"

namespace tl {

struct SideBySide {
  std::string prompt, before, after;
  std::string parent;  // the parent's generation, in a report with a parent
};

struct HealReport {
  std::string title;
  std::string before_label = "before", after_label = "after";
  EvalMeasures before, after;
  std::vector<SideBySide> samples;
  // The model before surgery (issue 24), measured on the same held-out data and prompts.
  bool has_parent = false;
  std::string parent_label = "parent";
  EvalMeasures parent;
};

// The share of the damage a heal repaired: (L_before − L_after) / (L_before − L_parent) for
// held-out losses; NaN when any is missing or the model before was not worse than the parent.
double recovered_fraction(double parent, double before, double after);

// Writes the files above into `dir` (each atomically); the plots only when `metrics_jsonl`
// exists and holds the records they need. Returns the PNG files written.
std::vector<std::filesystem::path> write_heal_report(const std::filesystem::path& dir, const HealReport& report,
                                                     const std::filesystem::path& metrics_jsonl);

}  // namespace tl
