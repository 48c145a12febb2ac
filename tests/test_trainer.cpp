// The trainer end to end on a tiny model made here (the project's tokenizer, a fresh init):
// resume equals an uninterrupted run, validation loss falls, and each bad input is refused
// clearly.
#include <fmt/format.h>

#include <fstream>
#include <map>
#include <sstream>
#include <nlohmann/json.hpp>

#include "core/checkpoint_dir.h"
#include "core/cpu/cpu_ops.h"
#include "train/surgery/init_model.h"
#include "golden_util.h"
#include "train/eval/generate.h"
#include "train/eval/text_measures.h"
#include "train/eval/plot.h"
#include "train/trainer.h"

namespace tl {
namespace {

namespace fs = std::filesystem;

using test::slurp;

// A scratch directory with a tiny base model, a dataset and a heal.yaml.
struct Workspace {
  fs::path dir;
  explicit Workspace(const std::string& name) {
    dir = fs::temp_directory_path() / fmt::format("tl_trainer_{}_{}", name, ::getpid());
    fs::remove_all(dir);
    fs::create_directories(dir);
    auto cfg = Gemma4Config::from_json(nlohmann::json::parse(R"({
      "model_type": "gemma4_text", "vocab_size": 4096, "vocab_size_per_layer_input": 4096,
      "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
      "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
      "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "global_head_dim": 32,
      "sliding_window": 16, "hidden_size_per_layer_input": 8, "num_kv_shared_layers": 2,
      "final_logit_softcapping": 30.0})"), "test");
    init_checkpoint(cfg, dir / "base", 3, 0.05, false);
    for (auto f : {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"})
      fs::copy_file(fs::path(TL_SOURCE_DIR) / "models/tiny" / f, dir / "base" / f);
    // A small chat dataset from the demo's heal data.
    std::ifstream in(fs::path(TL_SOURCE_DIR) / "data/demo/heal.jsonl");
    std::ofstream out(dir / "data.jsonl");
    std::string line;
    for (int i = 0; i < 40 && std::getline(in, line); ++i) out << line << "\n";
  }
  ~Workspace() { fs::remove_all(dir); }
  fs::path yaml(const std::string& extra = "", const std::string& name = "heal.yaml") const {
    std::ofstream(dir / name) << "base_model: base\nadapter: qlora\nlora_r: 4\nlora_alpha: 8\n"
                                 "datasets:\n  - path: data.jsonl\n    type: chat\n"
                                 "sequence_len: 128\nmicro_batch_size: 2\ngradient_accumulation_steps: 2\n"
                                 "max_steps: 6\nlearning_rate: 5.0e-3\nwarmup_steps: 2\nval_set_size: 0.1\n"
                                 "eval_steps: 3\nlogging_steps: 1\nseed: 5\nlora_dropout: 0.1\n"
                              << extra;
    return dir / name;
  }
};

double run(const fs::path& yaml, const std::vector<std::string>& overrides = {}, int64_t stop_after = 0,
           std::string* log = nullptr) {
  CpuOps ops;
  std::ostringstream out;
  Trainer t(TrainConfig::load(yaml, overrides), ops, out);
  t.stop_after_step = stop_after;
  double v = t.run();
  if (log) *log = out.str();
  return v;
}

TEST(Trainer, ResumedRunWritesTheSameMetricsAndAdapter) {
  Workspace w("resume");
  run(w.yaml(), {"output_dir=full"});
  run(w.yaml(), {"output_dir=split", "save_steps=2"}, 3);  // stopped after step 3
  ASSERT_TRUE(fs::exists(w.dir / "split/checkpoint-3/trainer_state.json"));
  ASSERT_FALSE(fs::exists(w.dir / "split/adapter_model.safetensors"));
  run(w.yaml(), {"output_dir=split", "save_steps=2", "resume_from_checkpoint=auto"});
  EXPECT_EQ(slurp(w.dir / "split/metrics.jsonl"), slurp(w.dir / "full/metrics.jsonl"));
  EXPECT_EQ(slurp(w.dir / "split/adapter_model.safetensors"), slurp(w.dir / "full/adapter_model.safetensors"));
  EXPECT_FALSE(slurp(w.dir / "full/metrics.jsonl").empty());
}

TEST(Trainer, ValidationLossFalls) {
  Workspace w("val");
  std::string log;
  run(w.yaml(), {"output_dir=o", "max_steps=12", "eval_steps=4", "lora_dropout=0"}, 0, &log);
  std::ifstream in(w.dir / "o/metrics.jsonl");
  std::vector<double> evals;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("eval_loss")) evals.push_back(j["eval_loss"]);
  }
  ASSERT_GE(evals.size(), 3u) << log;
  EXPECT_LT(evals.back(), evals.front()) << log;
}

// The generation check before, at eval_steps and after: each record of generations.jsonl is a greedy
// continuation of a held-out prompt. Before training (LoRA B = 0, no quantization) it must be
// exactly what greedy_generate gives on the base model, which matches transformers'
// generate (test_generate.cpp); the logged means are those of the records.
TEST(Trainer, GenerationCheckBeforeAndAfter) {
  Workspace w("gen");
  std::string log;
  run(w.yaml(), {"output_dir=o", "adapter=lora", "lora_dropout=0", "eval_table_size=3", "eval_max_new_tokens=12"}, 0,
      &log);
  CpuOps ops;
  Gemma4Model base(Gemma4Config::load(w.dir / "base"), ops);
  base.load(Checkpoint::open(w.dir / "base"));
  const Tokenizer tok = Tokenizer::load((w.dir / "base/tokenizer.json").string());
  const auto stop = stop_tokens_for(w.dir / "base", tok);
  EXPECT_NE(std::find(stop.begin(), stop.end(), 106), stop.end()) << "<turn|> ends a model turn";
  std::map<int64_t, std::vector<double>> reps;
  std::ifstream in(w.dir / "o/generations.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    reps[j["step"].get<int64_t>()].push_back(j["rep4"].get<double>());
    if (j["step"] != 0) continue;
    const auto prompt = tok.encode(j["prompt"].get<std::string>());
    ASSERT_EQ(prompt.front(), 2) << "chat prompts start with <bos>";
    const GreedyResult g = greedy_generate(base, ops, prompt, 12, stop);
    EXPECT_EQ(tok.decode(g.tokens), j["completion"].get<std::string>());
    // Scored without the stop token that ended it.
    const auto text = std::span<const int32_t>(g.tokens).first(g.tokens.size() - (g.stopped ? 1 : 0));
    EXPECT_DOUBLE_EQ(repetition_rate(text, 4), j["rep4"].get<double>());
    EXPECT_EQ(loops(text), j["loops"].get<bool>());
    EXPECT_EQ(g.stopped, j["stopped"].get<bool>());
  }
  ASSERT_EQ(reps.size(), 3u) << log;  // before, at eval_steps (3) and after
  EXPECT_EQ(reps[0].size(), 3u);
  EXPECT_EQ(reps[3].size(), 3u);
  EXPECT_EQ(reps[6].size(), 3u);
  // metrics.jsonl carries the means, before (step 0) and after (the last step).
  std::ifstream m(w.dir / "o/metrics.jsonl");
  std::map<int64_t, double> logged;
  while (std::getline(m, line))
    if (auto j = nlohmann::json::parse(line); j.contains("gen_rep4")) logged[j["step"]] = j["gen_rep4"];
  for (int64_t step : {0, 3, 6}) {
    double mean = 0;
    for (double r : reps[step]) mean += r / double(reps[step].size());
    EXPECT_NEAR(logged[step], mean, 1e-12) << "step " << step;
  }
  EXPECT_NE(log.find("generation rep-4"), std::string::npos) << log;
  // The heal report: both columns, and the loss curve as a PNG.
  const std::string report = test::slurp(w.dir / "o/report.md");
  EXPECT_NE(report.find("| seq-rep-4 |"), std::string::npos) << report;
  EXPECT_NE(report.find("| loop fraction |"), std::string::npos) << report;
  if (plots_available()) EXPECT_EQ(test::slurp(w.dir / "o/loss.png").substr(1, 3), "PNG");
  else EXPECT_NE(report.find("Plots skipped"), std::string::npos) << report;
}

TEST(Generation, PromptIsTheUntrainedPrefix) {
  Example chat{{2, 105, 10, 11, 106, 105, 12, 20, 21, 106}, {-100, -100, -100, -100, -100, -100, -100, 20, 21, 106}};
  EXPECT_EQ(generation_prompt(chat, 100), (std::vector<int32_t>{2, 105, 10, 11, 106, 105, 12}));
  EXPECT_EQ(generation_prompt(chat, 3), (std::vector<int32_t>{106, 105, 12}));  // the tail is kept
  Example text{{5, 6, 7, 8, 9, 10}, {5, 6, 7, 8, 9, 10}};  // all trained: continue the first half
  EXPECT_EQ(generation_prompt(text, 100), (std::vector<int32_t>{5, 6, 7}));
  Example untrained{{5, 6, 7}, {-100, -100, -100}};
  EXPECT_TRUE(generation_prompt(untrained, 100).empty());
}

using test::expect_error;

TEST(TrainerErrors, UnknownKeySuggestsTheNearest) {
  Workspace w("key");
  expect_error([&] { TrainConfig::load(w.yaml("learning_rat: 1\n")); }, "unknown key 'learning_rat' (did you mean 'learning_rate'?)");
  expect_error([&] { TrainConfig::load(w.yaml(), {"lora_alfa=3"}); }, "unknown key 'lora_alfa' (did you mean 'lora_alpha'?)");
}

// The shipped heal configs are valid (keys, types, ranges); paths are placeholders.
TEST(TrainerConfigs, ShippedHealConfigsLoad) {
  for (const char* name : {"demo-heal.yaml", "demo-pretrain.yaml", "recipe-e4b-upscale-heal.yaml"}) {
    const TrainConfig c = TrainConfig::load(fs::path(TL_SOURCE_DIR) / "configs" / name);
    EXPECT_FALSE(c.datasets.empty()) << name;
  }
  const TrainConfig heal = TrainConfig::load(fs::path(TL_SOURCE_DIR) / "configs/recipe-e4b-upscale-heal.yaml");
  EXPECT_EQ(heal.eval_table_size, 16);
  EXPECT_TRUE(heal.load_in_4bit);
}

TEST(TrainerErrors, GenerationCheckNeedsAValidationSplit) {
  Workspace w("generr");
  expect_error([&] { TrainConfig::load(w.yaml(), {"eval_table_size=2", "val_set_size=0"}); },
               "eval_table_size takes its prompts from the validation split; set val_set_size");
  expect_error([&] { TrainConfig::load(w.yaml(), {"eval_table_size=2", "eval_max_new_tokens=0"}); },
               "eval_max_new_tokens at least 1");
}

TEST(TrainerErrors, MissingOrEmptyDataset) {
  Workspace w("data");
  expect_error([&] { run(w.yaml(), {"output_dir=o", "datasets=[{path: nope.jsonl, type: chat}]"}); },
               "nope.jsonl: cannot open dataset");
  std::ofstream(w.dir / "empty.jsonl") << "\n\n";
  expect_error([&] { run(w.yaml(), {"output_dir=o", "datasets=[{path: empty.jsonl, type: chat}]"}); },
               "empty.jsonl: dataset is empty");
}

TEST(TrainerErrors, MalformedJsonlLineNamesFileAndLine) {
  Workspace w("jsonl");
  std::ofstream(w.dir / "bad.jsonl") << "{\"text\": \"fine\"}\n{\"text\": \"broken\"\n";
  expect_error([&] { run(w.yaml(), {"output_dir=o", "datasets=[{path: bad.jsonl, type: completion}]"}); },
               "bad.jsonl:2: not valid JSON");
  std::ofstream(w.dir / "nofield.jsonl") << "{\"body\": \"x\"}\n";
  expect_error([&] { run(w.yaml(), {"output_dir=o", "datasets=[{path: nofield.jsonl, type: completion}]"}); },
               "nofield.jsonl:1: missing field 'text'");
}

TEST(Trainer, OverlongSequencesAreTruncatedOrDroppedAndCounted) {
  Workspace w("long");
  CpuOps ops;
  std::ostringstream out;
  Trainer truncating(TrainConfig::load(w.yaml(), {"output_dir=o", "sequence_len=48"}), ops, out);
  EXPECT_GT(truncating.data_stats().truncated, 0);
  EXPECT_EQ(truncating.data_stats().dropped, 0);
  Trainer dropping(TrainConfig::load(w.yaml(), {"output_dir=o", "sequence_len=48", "overlong=drop"}), ops, out);
  EXPECT_EQ(dropping.data_stats().dropped, truncating.data_stats().truncated);
  EXPECT_EQ(dropping.data_stats().truncated, 0);
}

TEST(Trainer, NonFiniteLossStopsOrIsSkipped) {
  Workspace w("nan");
  // An absurd learning rate without clipping drives the weights to inf within a step or two.
  const std::vector<std::string> blowup{"output_dir=o", "learning_rate=1e30", "max_grad_norm=0", "warmup_steps=0",
                                        "val_set_size=0"};
  auto stop = blowup;
  stop.push_back("nan_policy=stop");
  expect_error([&] { run(w.yaml(), stop); }, "is not finite; stopping (nan_policy: stop)");
  std::string log;
  auto skip = blowup;
  skip[0] = "output_dir=o2";  // another run (nan_policy differs): its own directory
  run(w.yaml(), skip, 0, &log);
  EXPECT_NE(log.find("update skipped (nan_policy: skip)"), std::string::npos) << log;
}

TEST(Trainer, FailedSaveLeavesThePreviousCheckpointIntact) {
  Workspace w("save");
  CpuOps ops;
  std::ostringstream out;
  Trainer t(TrainConfig::load(w.yaml(), {"output_dir=o", "save_steps=2"}), ops, out);
  t.before_save = [](int64_t step) {
    if (step == 4) throw Error("simulated failure while saving (disk full)");
  };
  EXPECT_THROW(t.run(), Error);
  EXPECT_TRUE(fs::exists(w.dir / "o/checkpoint-2/adapter_model.safetensors"));
  EXPECT_TRUE(fs::exists(w.dir / "o/checkpoint-2/trainer_state.json"));
  EXPECT_FALSE(fs::exists(w.dir / "o/checkpoint-4"));
  for (auto& e : fs::directory_iterator(w.dir / "o"))
    EXPECT_EQ(e.path().filename().string().find(".partial"), std::string::npos) << e.path();
  // And the intact checkpoint resumes.
  run(w.yaml(), {"output_dir=o", "save_steps=2", "resume_from_checkpoint=auto"});
  EXPECT_TRUE(fs::exists(w.dir / "o/adapter_model.safetensors"));
}

TEST(Trainer, ReusedOutputDirOfAnotherRunIsRefusedAndNeverResumed) {
  Workspace w("reuse");
  run(w.yaml(), {"output_dir=o", "save_steps=2", "save_total_limit=1"});
  ASSERT_TRUE(fs::exists(w.dir / "o/checkpoint-4"));
  const std::string before = slurp(w.dir / "o/checkpoint-4/adapter_model.safetensors");
  expect_error([&] { run(w.yaml(), {"output_dir=o", "seed=9", "resume_from_checkpoint=auto"}); },
               "belongs to another run (checkpoint-4 is of run ");
  EXPECT_EQ(slurp(w.dir / "o/checkpoint-4/adapter_model.safetensors"), before);
  // The same config resumes its own run, and says which.
  std::string log;
  run(w.yaml(), {"output_dir=o", "save_steps=2", "save_total_limit=1", "resume_from_checkpoint=auto"}, 0, &log);
  EXPECT_NE(log.find("checkpoint-4 at step 4 (run "), std::string::npos) << log;
  // overwrite_output_dir: the other run's checkpoints go; pruning then counts only the new run's.
  run(w.yaml(), {"output_dir=o", "seed=9", "max_steps=3", "save_steps=1", "save_total_limit=2",
                 "overwrite_output_dir=true"});
  EXPECT_FALSE(fs::exists(w.dir / "o/checkpoint-4"));
  EXPECT_TRUE(fs::exists(w.dir / "o/checkpoint-1"));
  EXPECT_TRUE(fs::exists(w.dir / "o/checkpoint-2"));
}

}  // namespace
}  // namespace tl
