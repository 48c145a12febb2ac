#include "train/eval/report.h"

#include <fmt/format.h>

#include <cmath>
#include <fstream>

#include "core/safetensors.h"
#include "train/eval/plot.h"

namespace tl {

namespace fs = std::filesystem;

namespace {
std::string num(double v, int decimals = 4) { return std::isfinite(v) ? fmt::format("{:.{}f}", v, decimals) : "–"; }

// One line of Markdown table text: no newlines or pipes from generated text.
std::string cell(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  std::string out;
  for (char c : s) out += c == '|' ? std::string("\\|") : std::string(1, c);
  return out.size() > 300 ? out.substr(0, 300) + "…" : out;
}
}  // namespace

std::vector<fs::path> write_heal_report(const fs::path& dir, const HealReport& r, const fs::path& metrics_jsonl) {
  fs::create_directories(dir);
  std::vector<fs::path> pngs;
  // Curves from metrics.jsonl: training loss per logging step, the rest per evaluation.
  PlotSeries train{"training loss", {}, {}, false}, val{"validation loss", {}, {}, true};
  PlotSeries loopf{"loop fraction", {}, {}, true}, rep{"seq-rep-4", {}, {}, true};
  if (fs::exists(metrics_jsonl)) {
    std::ifstream in(metrics_jsonl);
    std::string line;
    while (std::getline(in, line)) {
      const auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.contains("step")) continue;
      const double step = j["step"].get<double>();
      auto add = [&](PlotSeries& s, const char* key) {
        if (j.contains(key) && j[key].is_number()) s.x.push_back(step), s.y.push_back(j[key].get<double>());
      };
      add(train, "loss");
      add(val, "eval_loss");
      add(loopf, "loop_fraction");
      add(rep, "gen_rep4");
    }
  }
  const bool have_curves = !train.x.empty() || !val.x.empty() || !loopf.x.empty() || !rep.x.empty();
  if (!plots_available()) {
    // Nothing drawn; report.md says so below.
  } else if (!train.x.empty() || !val.x.empty()) {
    pngs.push_back(dir / "loss.png");
    write_line_plot(pngs.back(), r.title + ": loss", "optimizer step", "cross-entropy (nats per token)", {train, val});
  }
  if (plots_available() && (!loopf.x.empty() || !rep.x.empty())) {
    pngs.push_back(dir / "generation.png");
    write_line_plot(pngs.back(), r.title + ": greedy generations", "optimizer step", "share of generations / n-grams",
                    {loopf, rep});
  }

  const EvalMeasures &b = r.before, &a = r.after;
  std::string md = fmt::format("# {}\n\n| measure | {} | {} |\n|---|---|---|\n", r.title, r.before_label, r.after_label);
  auto row = [&](const std::string& name, double x, double y, int d = 4) {
    if (std::isfinite(x) || std::isfinite(y)) md += fmt::format("| {} | {} | {} |\n", name, num(x, d), num(y, d));
  };
  row("held-out loss", b.eval_loss, a.eval_loss);
  row("held-out perplexity", b.perplexity, a.perplexity, 2);
  row("loop fraction", b.generation.loop_fraction, a.generation.loop_fraction, 3);
  row("seq-rep-4", b.generation.rep4, a.generation.rep4, 3);
  row("distinct-2", b.generation.distinct2, a.generation.distinct2, 3);
  row("distinct-3", b.generation.distinct3, a.generation.distinct3, 3);
  row("distinct-4", b.generation.distinct4, a.generation.distinct4, 3);
  row("longest repeated suffix (tokens)", b.generation.repeated_suffix, a.generation.repeated_suffix, 1);
  if (b.generation.count || a.generation.count)
    md += fmt::format("| generations ended by a stop token | {}/{} | {}/{} |\n", b.generation.stopped,
                      b.generation.count, a.generation.stopped, a.generation.count);
  row("cross-perplexity under the reference", b.cross_perplexity, a.cross_perplexity, 2);
  row("multiple-choice accuracy", b.mc_accuracy, a.mc_accuracy, 3);
  row("multiple-choice accuracy (per token)", b.mc_accuracy_norm, a.mc_accuracy_norm, 3);
  md += fmt::format(
      "\nA generation loops when its longest repeated suffix (the longest ending that also ends earlier in it) is at "
      "least {} tokens and a quarter of its length. Generations are greedy, from held-out prompts.\n",
      kLoopMinTokens);
  for (const fs::path& p : pngs) md += fmt::format("\n![{}]({})\n", p.stem().string(), p.filename().string());
  if (have_curves && !plots_available()) md += "\nPlots skipped: this build of torchless has no cairo.\n";
  if (!r.samples.empty()) {
    md += fmt::format("\n## Generations\n\n| prompt | {} | {} |\n|---|---|---|\n", r.before_label, r.after_label);
    for (const auto& s : r.samples) md += fmt::format("| {} | {} | {} |\n", cell(s.prompt), cell(s.before), cell(s.after));
  }
  write_file_atomic(dir / "report.md", md);
  nlohmann::json j{{"title", r.title}, {r.before_label, b.to_json()}, {r.after_label, a.to_json()}};
  j["samples"] = nlohmann::json::array();
  for (const auto& s : r.samples) j["samples"].push_back({{"prompt", s.prompt}, {"before", s.before}, {"after", s.after}});
  write_file_atomic(dir / "report.json", j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
  return pngs;
}

}  // namespace tl
