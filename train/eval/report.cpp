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

double recovered_fraction(double parent, double before, double after) {
  if (!std::isfinite(parent) || !std::isfinite(before) || !std::isfinite(after) || !(before > parent)) return NAN;
  return (before - after) / (before - parent);
}

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
    std::vector<PlotSeries> curves{train, val};
    if (r.has_parent && std::isfinite(r.parent.eval_loss)) {
      // The parent's held-out loss as a level across the run: what the heal aims back at.
      double lo = INFINITY, hi = -INFINITY;
      for (const PlotSeries* s : {&train, &val})
        for (double x : s->x) lo = std::min(lo, x), hi = std::max(hi, x);
      curves.push_back({r.parent_label, {lo, hi}, {r.parent.eval_loss, r.parent.eval_loss}, false});
    }
    pngs.push_back(dir / "loss.png");
    write_line_plot(pngs.back(), r.title + ": loss", "optimizer step", "cross-entropy (nats per token)", curves);
  }
  if (plots_available() && (!loopf.x.empty() || !rep.x.empty())) {
    pngs.push_back(dir / "generation.png");
    write_line_plot(pngs.back(), r.title + ": greedy generations", "optimizer step", "share of generations / n-grams",
                    {loopf, rep});
  }

  const EvalMeasures &b = r.before, &a = r.after, &p = r.parent;
  const bool par = r.has_parent;
  std::string md = par ? fmt::format("# {}\n\n| measure | {} | {} | {} |\n|---|---|---|---|\n", r.title, r.parent_label,
                                     r.before_label, r.after_label)
                       : fmt::format("# {}\n\n| measure | {} | {} |\n|---|---|---|\n", r.title, r.before_label,
                                     r.after_label);
  // One row; the parent's cell only in a report with a parent.
  auto cells = [&](const std::string& name, const std::string& x, const std::string& y, const std::string& z) {
    md += par ? fmt::format("| {} | {} | {} | {} |\n", name, x, y, z) : fmt::format("| {} | {} | {} |\n", name, y, z);
  };
  auto row = [&](const std::string& name, double pv, double x, double y, int d = 4) {
    if (std::isfinite(x) || std::isfinite(y) || (par && std::isfinite(pv))) cells(name, num(pv, d), num(x, d), num(y, d));
  };
  const double recovered = par ? recovered_fraction(p.eval_loss, b.eval_loss, a.eval_loss) : NAN;
  row("held-out loss", p.eval_loss, b.eval_loss, a.eval_loss);
  if (par && std::isfinite(recovered))
    cells("recovered fraction of the damage", "1", "0", fmt::format("{:.3f}", recovered));
  row("held-out perplexity", p.perplexity, b.perplexity, a.perplexity, 2);
  if (par && (std::isfinite(b.kl_parent) || std::isfinite(a.kl_parent))) {
    cells("KL to the parent (nats per token)", "0", num(b.kl_parent), num(a.kl_parent));
    cells("top-1 agreement with the parent", "1", num(b.top1_parent, 3), num(a.top1_parent, 3));
  }
  row("loop fraction", p.generation.loop_fraction, b.generation.loop_fraction, a.generation.loop_fraction, 3);
  row("seq-rep-4", p.generation.rep4, b.generation.rep4, a.generation.rep4, 3);
  row("distinct-2", p.generation.distinct2, b.generation.distinct2, a.generation.distinct2, 3);
  row("distinct-3", p.generation.distinct3, b.generation.distinct3, a.generation.distinct3, 3);
  row("distinct-4", p.generation.distinct4, b.generation.distinct4, a.generation.distinct4, 3);
  row("longest repeated suffix (tokens)", p.generation.repeated_suffix, b.generation.repeated_suffix,
      a.generation.repeated_suffix, 1);
  if (b.generation.count || a.generation.count)
    cells("generations ended by a stop token", fmt::format("{}/{}", p.generation.stopped, p.generation.count),
          fmt::format("{}/{}", b.generation.stopped, b.generation.count),
          fmt::format("{}/{}", a.generation.stopped, a.generation.count));
  row("cross-perplexity under the reference", p.cross_perplexity, b.cross_perplexity, a.cross_perplexity, 2);
  row("multiple-choice accuracy", p.mc_accuracy, b.mc_accuracy, a.mc_accuracy, 3);
  row("multiple-choice accuracy (per token)", p.mc_accuracy_norm, b.mc_accuracy_norm, a.mc_accuracy_norm, 3);
  if (par)
    md += fmt::format(
        "\nThe parent is the model before surgery, measured on the same held-out data and prompts. The recovered "
        "fraction is (L_before − L_after) / (L_before − L_parent) of the held-out losses; KL to the parent is "
        "KL(p_parent ‖ p_model) at temperature 1 over the whole vocabulary, per held-out target.\n");
  md += fmt::format(
      "\nA generation loops when its longest repeated suffix (the longest ending that also ends earlier in it) is at "
      "least {} tokens and a quarter of its length. Generations are greedy, from held-out prompts.\n",
      kLoopMinTokens);
  for (const fs::path& p : pngs) md += fmt::format("\n![{}]({})\n", p.stem().string(), p.filename().string());
  if (have_curves && !plots_available()) md += "\nPlots skipped: this build of torchless has no cairo.\n";
  if (!r.samples.empty()) {
    if (par) {
      md += fmt::format("\n## Generations\n\n| prompt | {} | {} | {} |\n|---|---|---|---|\n", r.parent_label,
                        r.before_label, r.after_label);
      for (const auto& s : r.samples)
        md += fmt::format("| {} | {} | {} | {} |\n", cell(s.prompt), cell(s.parent), cell(s.before), cell(s.after));
    } else {
      md += fmt::format("\n## Generations\n\n| prompt | {} | {} |\n|---|---|---|\n", r.before_label, r.after_label);
      for (const auto& s : r.samples) md += fmt::format("| {} | {} | {} |\n", cell(s.prompt), cell(s.before), cell(s.after));
    }
  }
  write_file_atomic(dir / "report.md", md);
  nlohmann::json j{{"title", r.title}, {r.before_label, b.to_json()}, {r.after_label, a.to_json()}};
  if (par) {
    j["parent"] = {{"label", r.parent_label}, {"measures", p.to_json()}};
    if (std::isfinite(recovered)) j["recovered_fraction"] = recovered;
  }
  j["samples"] = nlohmann::json::array();
  for (const auto& s : r.samples) {
    j["samples"].push_back({{"prompt", s.prompt}, {"before", s.before}, {"after", s.after}});
    if (par) j["samples"].back()["parent"] = s.parent;
  }
  write_file_atomic(dir / "report.json", j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
  return pngs;
}

}  // namespace tl
