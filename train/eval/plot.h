// Line plots as PNG, drawn with cairo (libcairo2-dev): the heal report's training and
// validation curves. A build without cairo (TL_WITH_CAIRO off, or cairo not found: the GPU
// bundle) draws none: plots_available() says so and the report says the plots were skipped.
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
bool plots_available();

void write_line_plot(const std::filesystem::path& png, const std::string& title, const std::string& x_label,
                     const std::string& y_label, const std::vector<PlotSeries>& series);

}  // namespace tl
