// Line plots as PNG, drawn with cairo (libcairo2-dev): the heal report's training and
// validation curves.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

namespace tl {

struct PlotSeries {
  std::string name;
  std::vector<double> x, y;
  bool markers = false;  // dots at each point (sparse series such as validation loss)
};

// Writes an 800×480 PNG (atomically) with labelled axes, ticks and a legend. Non-finite
// points are skipped. Throws tl::Error when the file cannot be written.
void write_line_plot(const std::filesystem::path& png, const std::string& title, const std::string& x_label,
                     const std::string& y_label, const std::vector<PlotSeries>& series);

}  // namespace tl
