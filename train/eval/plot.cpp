#include "train/eval/plot.h"

#include <fmt/format.h>
#if defined(TL_HAVE_CAIRO)
#include <cairo.h>
#endif

#include <algorithm>
#include <cmath>

#include "core/tensor.h"

namespace tl {

#if !defined(TL_HAVE_CAIRO)
bool plots_available() { return false; }
void write_line_plot(const std::filesystem::path& png, const std::string&, const std::string&, const std::string&,
                     const std::vector<PlotSeries>&) {
  throw Error(png.string() + ": this build has no cairo, so it draws no plots");
}
#else
bool plots_available() { return true; }

namespace {
// Tick spacing: 1, 2 or 5 × 10^k, giving about `target` ticks over [lo, hi].
double nice_step(double lo, double hi, int target) {
  const double raw = (hi - lo) / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0})
    if (raw <= m * mag) return m * mag;
  return 10 * mag;
}

std::string tick_label(double v, double step) {
  const int decimals = std::max(0, int(-std::floor(std::log10(step) + 1e-9)));
  return fmt::format("{:.{}f}", std::abs(v) < step * 1e-6 ? 0.0 : v, decimals);
}

constexpr double kColors[][3] = {{0.12, 0.47, 0.71}, {0.84, 0.15, 0.16}, {0.17, 0.63, 0.17}, {1.0, 0.5, 0.05}};
}  // namespace

void write_line_plot(const std::filesystem::path& png, const std::string& title, const std::string& x_label,
                     const std::string& y_label, const std::vector<PlotSeries>& series) {
  constexpr int W = 800, H = 480;
  constexpr double left = 80, right = 20, top = 40, bottom = 60;
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (const auto& s : series)
    for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i)
      if (std::isfinite(s.x[i]) && std::isfinite(s.y[i])) {
        x0 = std::min(x0, s.x[i]), x1 = std::max(x1, s.x[i]);
        y0 = std::min(y0, s.y[i]), y1 = std::max(y1, s.y[i]);
      }
  if (!std::isfinite(x0)) x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  if (x1 <= x0) x1 = x0 + 1;
  if (y1 <= y0) y0 -= 0.5, y1 += 0.5;
  const double pad = 0.05 * (y1 - y0);
  y0 -= pad, y1 += pad;
  const double pw = W - left - right, ph = H - top - bottom;
  auto px = [&](double x) { return left + (x - x0) / (x1 - x0) * pw; };
  auto py = [&](double y) { return top + (y1 - y) / (y1 - y0) * ph; };

  cairo_surface_t* surface = cairo_image_surface_create(CAIRO_FORMAT_RGB24, W, H);
  cairo_t* cr = cairo_create(surface);
  cairo_set_source_rgb(cr, 1, 1, 1);
  cairo_paint(cr);
  cairo_select_font_face(cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
  auto text = [&](double x, double y, const std::string& s, double size, double align_x, double align_y) {
    cairo_set_font_size(cr, size);
    cairo_text_extents_t e;
    cairo_text_extents(cr, s.c_str(), &e);
    cairo_move_to(cr, x - align_x * e.width - e.x_bearing, y - align_y * e.height - e.y_bearing);
    cairo_show_text(cr, s.c_str());
  };

  // Grid and ticks.
  cairo_set_line_width(cr, 1);
  const double xs = nice_step(x0, x1, 8), ys = nice_step(y0, y1, 6);
  for (double v = std::ceil(x0 / xs) * xs; v <= x1 + 1e-9 * xs; v += xs) {
    cairo_set_source_rgb(cr, 0.9, 0.9, 0.9);
    cairo_move_to(cr, px(v), top), cairo_line_to(cr, px(v), top + ph), cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0, 0, 0);
    text(px(v), top + ph + 6, tick_label(v, xs), 12, 0.5, 0);
  }
  for (double v = std::ceil(y0 / ys) * ys; v <= y1 + 1e-9 * ys; v += ys) {
    cairo_set_source_rgb(cr, 0.9, 0.9, 0.9);
    cairo_move_to(cr, left, py(v)), cairo_line_to(cr, left + pw, py(v)), cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0, 0, 0);
    text(left - 6, py(v), tick_label(v, ys), 12, 1, 0.5);
  }
  cairo_set_source_rgb(cr, 0, 0, 0);
  cairo_rectangle(cr, left, top, pw, ph);
  cairo_stroke(cr);
  text(W / 2.0, 12, title, 16, 0.5, 0);
  text(left + pw / 2, H - 8, x_label, 14, 0.5, 1);
  cairo_save(cr);  // the y label, rotated a quarter turn
  cairo_translate(cr, 18, top + ph / 2);
  cairo_rotate(cr, -M_PI / 2);
  text(0, 0, y_label, 14, 0.5, 0.5);
  cairo_restore(cr);

  // Series, then the legend in the top-right corner.
  cairo_rectangle(cr, left, top, pw, ph);
  cairo_save(cr);
  cairo_clip(cr);
  for (size_t k = 0; k < series.size(); ++k) {
    const auto& c = kColors[k % 4];
    const auto& s = series[k];
    cairo_set_source_rgb(cr, c[0], c[1], c[2]);
    cairo_set_line_width(cr, 2);
    bool pen = false;
    for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      if (pen) cairo_line_to(cr, px(s.x[i]), py(s.y[i]));
      else cairo_move_to(cr, px(s.x[i]), py(s.y[i]));
      pen = true;
    }
    cairo_stroke(cr);
    if (s.markers)
      for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i)
        if (std::isfinite(s.x[i]) && std::isfinite(s.y[i])) {
          cairo_arc(cr, px(s.x[i]), py(s.y[i]), 4, 0, 2 * M_PI);
          cairo_fill(cr);
        }
  }
  cairo_restore(cr);
  for (size_t k = 0; k < series.size(); ++k) {
    const auto& c = kColors[k % 4];
    const double ly = top + 16 + 20 * double(k), lx = left + pw - 170;
    cairo_set_source_rgb(cr, c[0], c[1], c[2]);
    cairo_set_line_width(cr, 3);
    cairo_move_to(cr, lx, ly), cairo_line_to(cr, lx + 24, ly), cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0, 0, 0);
    text(lx + 30, ly, series[k].name, 13, 0, 0.5);
  }
  cairo_destroy(cr);
  const std::filesystem::path tmp = png.string() + ".tmp";
  const cairo_status_t status = cairo_surface_write_to_png(surface, tmp.c_str());
  cairo_surface_destroy(surface);
  if (status != CAIRO_STATUS_SUCCESS)
    throw Error(fmt::format("{}: cannot write the plot ({})", png.string(), cairo_status_to_string(status)));
  std::filesystem::rename(tmp, png);
}

#endif

}  // namespace tl
