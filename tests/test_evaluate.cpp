// Multiple-choice option log-likelihoods against transformers (fixture:
// scripts/golden/make_mc_golden.py), and the multiple-choice file's formats and errors.
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "core/cpu/cpu_ops.h"
#include "golden_util.h"
#include "train/eval/evaluate.h"

namespace tl {
namespace {

class OptionGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(OptionGolden, LogLikelihoodsMatchTransformers) {
  const auto record = nlohmann::json::parse(test::slurp(test::golden("mc/options.json")));
  const std::string dir = test::golden(GetParam());
  for (const DType dt : {DType::F32, DType::F64}) {
    CpuOps ops(dt);
    Gemma4Model model(Gemma4Config::load(dir), ops);
    model.load(Checkpoint::open(dir));
    const char* key = dt == DType::F32 ? "loglik_fp32" : "loglik_fp64";
    const double tol = dt == DType::F32 ? 2e-4 : 1e-9;
    for (const auto& item : record.at("variants").at(GetParam())) {
      const auto context = item.at("context").get<std::vector<int32_t>>();
      const auto options = item.at("options").get<std::vector<std::vector<int32_t>>>();
      const auto want = item.at(key).get<std::vector<double>>();
      ASSERT_EQ(options.size(), want.size());
      for (size_t o = 0; o < options.size(); ++o)
        EXPECT_NEAR(continuation_loglik(model, ops, context, options[o]), want[o], tol)
            << key << " context " << context.size() << " option " << o;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, OptionGolden, ::testing::Values("dense_kv", "e2b", "e4b", "moe"));

// A file under the temporary directory, removed when the test ends.
struct TempFile {
  std::filesystem::path path;
  TempFile(const std::string& name, const std::string& text)
      : path(std::filesystem::temp_directory_path() / ("tl_eval_" + name)) {
    std::ofstream(path) << text;
  }
  ~TempFile() { std::filesystem::remove(path); }
};

TEST(MultipleChoice, ReadsBothFormats) {
  const TempFile p("ok.jsonl",
                            "{\"question\": \"2+2?\", \"choices\": [\"3\", \"4\"], \"answer\": 1}\n\n"
                            "{\"question\": \"Sky?\", \"choices\": [\"blue\", \"green\", \"red\"], \"answer\": \"A\"}\n"
                            "{\"Question\": \"Water?\", \"Correct Answer\": \"H2O\", \"Incorrect Answer 1\": \"CO2\", "
                            "\"Incorrect Answer 2\": \"O2\"}\n");
  const auto items = load_mc_jsonl(p.path);
  ASSERT_EQ(items.size(), 3u);
  EXPECT_EQ(items[0].answer, 1);
  EXPECT_EQ(items[1].answer, 0);
  EXPECT_EQ(items[1].options.size(), 3u);
  EXPECT_EQ(items[2].options, (std::vector<std::string>{"H2O", "CO2", "O2"}));
  EXPECT_EQ(items[2].answer, 0);
}

TEST(MultipleChoice, RefusesAnItemWithoutACorrectAnswer) {
  test::expect_error([] {
    const TempFile f("noanswer.jsonl", "{\"question\": \"q\", \"choices\": [\"a\", \"b\"]}\n");
    load_mc_jsonl(f.path);
  },
                     "tl_eval_noanswer.jsonl:1: no correct answer");
  test::expect_error([] {
    const TempFile f("range.jsonl", "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 2}\n");
    load_mc_jsonl(f.path);
  },
                     "tl_eval_range.jsonl:1: no correct answer");
  test::expect_error([] {
    const TempFile f("gpqa.jsonl", "{\"Question\": \"q\", \"Incorrect Answer 1\": \"a\"}\n");
    load_mc_jsonl(f.path);
  },
                     "tl_eval_gpqa.jsonl:1: no correct answer");
  test::expect_error([] {
    const TempFile f("bad.jsonl", "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 0}\n{oops\n");
    load_mc_jsonl(f.path);
  },
                     "tl_eval_bad.jsonl:2: not a JSON object");
}

}  // namespace
}  // namespace tl
