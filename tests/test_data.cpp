// The data pipeline: each jsonl type renders as the Gemma 4 chat format with loss on the
// model's turns, packing keeps documents apart, and full-rank layers train beside LoRA.
#include <fstream>
#include <sstream>

#include "core/chat_template.h"
#include "core/cpu/cpu_ops.h"
#include "golden_util.h"
#include "train/data/data.h"
#include "train/trainer.h"

namespace tl {
namespace {

namespace fs = std::filesystem;

struct Dir {
  fs::path p = fs::temp_directory_path() / ("tl_data_" + std::to_string(::getpid()));
  Dir() { fs::remove_all(p), fs::create_directories(p); }
  ~Dir() { fs::remove_all(p); }
};

Tokenizer tiny_tokenizer() { return Tokenizer::load(std::string(TL_SOURCE_DIR) + "/models/tiny/tokenizer.json"); }

TrainConfig config_for(const fs::path& dir, const std::string& dataset_yaml) {
  std::ofstream(dir / "c.yaml") << "base_model: " << TL_SOURCE_DIR << "/models/tiny\ndatasets:\n" << dataset_yaml
                                << "max_steps: 1\n";
  return TrainConfig::load(dir / "c.yaml");
}

// The ids and labels the chat template gives for one user/assistant exchange.
EncodedChat expected(const Tokenizer& tok, const std::string& user, const std::string& answer) {
  return encode_chat(tok, {{"user", user, ""}, {"assistant", answer, ""}});
}

TEST(Data, AlpacaShareGptAndChatRenderTheSameExchange) {
  Dir d;
  std::ofstream(d.p / "alpaca.jsonl") << R"({"instruction": "Define foo.", "input": "In hacker jargon.", "output": "A metasyntactic variable."})" "\n";
  std::ofstream(d.p / "sharegpt.jsonl") << R"({"conversations": [{"from": "human", "value": "Define foo.\n\nIn hacker jargon."}, {"from": "gpt", "value": "A metasyntactic variable."}]})" "\n";
  std::ofstream(d.p / "chat.jsonl") << R"({"msgs": [{"who": "user", "text": "Define foo.\n\nIn hacker jargon."}, {"who": "assistant", "text": "A metasyntactic variable."}]})" "\n";
  Tokenizer tok = tiny_tokenizer();
  EncodedChat want = expected(tok, "Define foo.\n\nIn hacker jargon.", "A metasyntactic variable.");
  for (const std::string ds : {"  - path: alpaca.jsonl\n    type: alpaca\n", "  - path: sharegpt.jsonl\n    type: sharegpt\n",
                               "  - path: chat.jsonl\n    type: chat\n    field_messages: msgs\n"
                               "    message_field_role: who\n    message_field_content: text\n"}) {
    DataStats stats;
    auto ex = load_examples(config_for(d.p, ds).data(), tok, stats);
    ASSERT_EQ(ex.size(), 1u) << ds;
    EXPECT_EQ(ex[0].ids, want.ids) << ds;
    EXPECT_EQ(ex[0].labels, want.labels) << ds;
    // Loss only on the model's answer (and its <turn|>): some labels ignored, some trained.
    EXPECT_NE(std::count(ex[0].labels.begin(), ex[0].labels.end(), -100), 0);
    EXPECT_GT(stats.trained_tokens, 0);
  }
}

TEST(Data, CompletionAddsBosAndEosAndTrainsEverything) {
  Dir d;
  std::ofstream(d.p / "t.jsonl") << R"({"content": "hello world"})" "\n";
  Tokenizer tok = tiny_tokenizer();
  DataStats stats;
  auto ex = load_examples(config_for(d.p, "  - path: t.jsonl\n    type: completion\n    field: content\n").data(), tok, stats);
  ASSERT_EQ(ex.size(), 1u);
  EXPECT_EQ(ex[0].ids.front(), tok.token_id("<bos>"));
  EXPECT_EQ(ex[0].ids.back(), tok.token_id("<eos>"));
  EXPECT_EQ(ex[0].labels, ex[0].ids);
}

TEST(Data, PackingRestartsPositionsSeparatesDocumentsAndMasksBoundaries) {
  std::vector<Example> ex = {{{2, 10, 11, 1}, {2, 10, 11, 1}}, {{2, 20, 21}, {2, 20, 21}}, {{2, 30}, {2, 30}}};
  auto rows = make_rows(ex, 8, true);
  ASSERT_EQ(rows.size(), 2u);  // 4 + 3 fit in 8; the third starts a new row
  EXPECT_EQ(rows[0].ids, (std::vector<int32_t>{2, 10, 11, 1, 2, 20, 21}));
  EXPECT_EQ(rows[0].positions, (std::vector<int32_t>{0, 1, 2, 3, 0, 1, 2}));
  EXPECT_EQ(rows[0].doc_ids, (std::vector<int32_t>{0, 0, 0, 0, 1, 1, 1}));
  // The first label of each document is ignored, so no target crosses a boundary.
  EXPECT_EQ(rows[0].labels, (std::vector<int32_t>{-100, 10, 11, 1, -100, 20, 21}));
  auto unpacked = make_rows(ex, 8, false);
  EXPECT_EQ(unpacked.size(), 3u);
  auto mb = make_micro_batch(rows, {0, 1}, 0, 2);
  EXPECT_EQ(mb.batch.ids.dim(1), 7);
  EXPECT_EQ(mb.labels.data<int32_t>()[7 + 2], -100);  // row 1 is padded after its 2 tokens
  EXPECT_EQ(mb.batch.doc_ids.data<int32_t>()[7 + 2], -1);
}

TEST(Data, PackedDocumentsGiveTheSameLossAsSeparateRows) {
  // Packing must not change what each document sees: loss of the packed row equals the sum
  // over the documents run one per row.
  CpuOps ops(DType::F64);
  const std::string base = std::string(TL_SOURCE_DIR) + "/models/tiny";
  Gemma4Model m(Gemma4Config::load(base), ops);
  m.load(Checkpoint::open(base));
  std::vector<Example> ex = {{{2, 100, 200, 300, 400}, {2, 100, 200, 300, 400}}, {{2, 500, 600, 700}, {2, 500, 600, 700}}};
  auto packed = make_rows(ex, 16, true), single = make_rows(ex, 16, false);
  auto loss_of = [&](const std::vector<Row>& rows) {
    double sum = 0;
    for (int64_t i = 0; i < int64_t(rows.size()); ++i) {
      auto mb = make_micro_batch(rows, {i}, 0, 1);
      sum += m.loss(m.forward_hidden(mb.batch), mb.labels).sum;
    }
    return sum;
  };
  EXPECT_NEAR(loss_of(packed), loss_of(single), 1e-10);
}

TEST(Trainer, FullTrainLayersTrainBesideLora) {
  Dir d;
  std::ifstream in(std::string(TL_SOURCE_DIR) + "/data/demo/heal.jsonl");
  std::ofstream out(d.p / "data.jsonl");
  std::string line;
  for (int i = 0; i < 8 && std::getline(in, line); ++i) out << line << "\n";
  out.close();
  std::ofstream(d.p / "h.yaml") << "base_model: " << TL_SOURCE_DIR << "/models/tiny\nadapter: lora\nlora_r: 2\n"
                                << "lora_target_modules: [q_proj]\nfull_train_layers: [5]\n"
                                << "datasets:\n  - path: data.jsonl\n    type: chat\nmax_steps: 2\n"
                                << "learning_rate: 1.0e-2\nwarmup_steps: 0\noutput_dir: o\n";
  CpuOps ops;
  std::ostringstream log;
  Trainer t(TrainConfig::load(d.p / "h.yaml"), ops, log);
  t.run();
  auto full = SafetensorsFile::open(d.p / "o/trainable.safetensors");
  auto base = Checkpoint::open(std::string(TL_SOURCE_DIR) + "/models/tiny");
  ASSERT_TRUE(full.contains("model.layers.5.mlp.down_proj.weight"));
  EXPECT_FALSE(full.contains("model.layers.4.mlp.down_proj.weight"));
  auto diff = test::compare(full.get("model.layers.5.mlp.down_proj.weight"), base.get("model.layers.5.mlp.down_proj.weight"));
  EXPECT_GT(diff.max_abs, 1e-4);  // it trained
  EXPECT_TRUE(fs::exists(d.p / "o/adapter_model.safetensors"));
}

}  // namespace
}  // namespace tl
