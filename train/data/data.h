// Training data: jsonl datasets → token ids with loss labels → (packed) rows → micro-batches.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tokenizer.h"
#include "train/model/gemma4_model.h"

namespace tl {

// One dataset of heal.yaml's `datasets:` list.
struct DatasetConfig {
  std::string path;
  std::string type = "completion";  // completion|text, alpaca, chat|chat_template, sharegpt
  // Field mappings for other shapes of jsonl.
  std::string field = "text";                   // completion/text
  std::string field_instruction = "instruction", field_input = "input", field_output = "output";  // alpaca
  std::string field_messages = "messages";      // chat ("conversations" for sharegpt)
  std::string message_field_role = "role", message_field_content = "content";
  std::vector<std::string> roles_to_train{"assistant"};
};

// The keys of heal.yaml the data pipeline reads (TrainConfig::data() gives them).
struct DataConfig {
  std::vector<DatasetConfig> datasets;
  int64_t sequence_len = 2048;
  std::string overlong = "truncate";  // truncate | drop
  bool train_on_inputs = false;
};

// A micro-batch: the model's input and its labels (host [B, S], unshifted).
struct MicroBatch {
  Batch batch;
  Tensor labels;
};

// One training document: ids and labels (−100 where no loss), unshifted (HF convention).
struct Example {
  std::vector<int32_t> ids, labels;
};

struct DataStats {
  int64_t examples = 0, truncated = 0, dropped = 0, tokens = 0, trained_tokens = 0;
};

// Reads every dataset of `cfg`, renders and tokenizes each line by its type, applies the
// overlong policy. Errors name the file and line ("data.jsonl:17: ..."); an empty dataset
// is an error.
std::vector<Example> load_examples(const DataConfig& cfg, const Tokenizer& tok, DataStats& stats);

// Splits off ceil(val_set_size·n) examples (chosen by a seeded shuffle) for validation.
void split_validation(std::vector<Example>& train, std::vector<Example>& val, double fraction, uint64_t seed);

// A row of the batch: several documents packed back to back (or one, unpacked).
struct Row {
  std::vector<int32_t> ids, labels, positions, doc_ids;
};

// Greedy packing in order into rows of at most `sequence_len` tokens; positions restart and
// doc ids change at each document, and the first label of each document is −100 so no
// target crosses a boundary. With packing off, one document per row.
std::vector<Row> make_rows(const std::vector<Example>& examples, int64_t sequence_len, bool packing);

// Rows [begin, begin+count) of `order` as one micro-batch, right-padded with <pad> (id 0,
// label −100, its own doc id) to the longest row.
MicroBatch make_micro_batch(const std::vector<Row>& rows, const std::vector<int64_t>& order, int64_t begin,
                            int64_t count);

// The order rows are visited in during `epoch`: a seeded Fisher–Yates shuffle.
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch);

}  // namespace tl
