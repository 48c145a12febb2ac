// What llama.cpp computes for a GGUF, for scripts/interop/llama-cpp.sh to compare with
// torchless-forward --output. Built there against the llama.cpp that script fetches (its
// libllama and llama-common); not part of torchless' build.
//
//   llama_dump logits   MODEL.gguf IDS.txt OUT.f32   all positions' logits of one sequence,
//                                                   one batch, raw float32 [S, V]
//   llama_dump greedy   MODEL.gguf IDS.txt N         the prompt, then N greedy tokens decoded
//                                                   one at a time (the KV cache, shared layers
//                                                   included, carries the context); prints ids
//   llama_dump tokenize MODEL.gguf TEXT.txt          llama_tokenize(add_special=false,
//                                                   parse_special=true); prints ids
//   llama_dump tokenize-as-cli MODEL.gguf TEXT.txt   add_special=true, parse_special=true, as
//                                                   llama-cli tokenizes a rendered chat (the
//                                                   GGUF's add_bos_token decides the BOS)
//   llama_dump chat     MODEL.gguf MESSAGES.json     the GGUF's chat template through llama.cpp's
//                                                   Jinja engine (as llama-cli --jinja), with the
//                                                   generation prompt, thinking off; prints it
//
// logits and greedy take these settings after their arguments:
//   --cache-type f16|f32   K and V cache type (llama.cpp's default, and llama-cli's -ctk/-ctv,
//                          is f16, which rounds every K and V to fp16)
//   --flash-attn on|off|auto   llama-cli's -fa (default auto)
//   --repack on|off        weight repacking into extra buffer types such as ggml's AMX one
//                          (llama-cli's --repack / --no-repack, default on)
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "chat.h"
#include "llama.h"
#include "nlohmann/json.hpp"

namespace {

[[noreturn]] void fail(const std::string& m) {
  std::fprintf(stderr, "llama_dump: %s\n", m.c_str());
  std::exit(1);
}

std::string slurp(const char* path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(std::string(path) + ": cannot open");
  return {std::istreambuf_iterator<char>(in), {}};
}

std::vector<llama_token> read_ids(const char* path) {
  std::istringstream ss(slurp(path));
  std::vector<llama_token> ids;
  for (long v; ss >> v;) ids.push_back(llama_token(v));
  if (ids.empty()) fail(std::string(path) + ": no token ids");
  return ids;
}

struct context_settings {
  ggml_type cache_type = GGML_TYPE_F16;  // llama_context_default_params()' type_k and type_v
  llama_flash_attn_type flash_attn = LLAMA_FLASH_ATTN_TYPE_AUTO;
  bool repack = true;  // llama_model_default_params()' use_extra_bufts
};

// Takes --cache-type and --flash-attn off the end of argv; returns the positional count.
int parse_settings(int argc, char** argv, context_settings& s) {
  while (argc >= 3 && std::string(argv[argc - 2]).rfind("--", 0) == 0) {
    const std::string key = argv[argc - 2], value = argv[argc - 1];
    if (key == "--cache-type" && (value == "f16" || value == "f32")) {
      s.cache_type = value == "f32" ? GGML_TYPE_F32 : GGML_TYPE_F16;
    } else if (key == "--flash-attn" && (value == "on" || value == "off" || value == "auto")) {
      s.flash_attn = value == "on" ? LLAMA_FLASH_ATTN_TYPE_ENABLED
                     : value == "off" ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_AUTO;
    } else if (key == "--repack" && (value == "on" || value == "off")) {
      s.repack = value == "on";
    } else {
      fail("bad setting " + key + " " + value + " (--cache-type f16|f32, --flash-attn on|off|auto, --repack on|off)");
    }
    argc -= 2;
  }
  return argc;
}

llama_context* context(llama_model* model, int n_ctx, const context_settings& s) {
  llama_context_params cp = llama_context_default_params();
  cp.type_k = cp.type_v = s.cache_type;
  cp.flash_attn_type = s.flash_attn;
  cp.n_ctx = uint32_t(n_ctx);
  cp.n_batch = uint32_t(n_ctx);
  cp.n_ubatch = uint32_t(n_ctx);
  cp.n_threads = cp.n_threads_batch = 2;
  llama_context* ctx = llama_init_from_model(model, cp);
  if (!ctx) fail("cannot create a context");
  return ctx;
}

// Decodes ids[from, to) at positions from…to−1; `all` asks for every position's logits.
void decode(llama_context* ctx, const std::vector<llama_token>& ids, int from, int to, bool all) {
  llama_batch b = llama_batch_init(to - from, 0, 1);
  for (int i = from; i < to; ++i) {
    const int k = i - from;
    b.token[k] = ids[size_t(i)];
    b.pos[k] = i;
    b.n_seq_id[k] = 1;
    b.seq_id[k][0] = 0;
    b.logits[k] = all || i == to - 1;
  }
  b.n_tokens = to - from;
  if (llama_decode(ctx, b) != 0) fail("llama_decode failed");
  llama_batch_free(b);
}

}  // namespace

int main(int argc, char** argv) {
  context_settings settings;
  argc = parse_settings(argc, argv, settings);
  if (argc < 4) fail("usage: llama_dump logits|greedy|tokenize|chat MODEL.gguf FILE [OUT|N]");
  const std::string mode = argv[1];
  llama_log_set([](ggml_log_level level, const char* text, void*) {
    if (level >= GGML_LOG_LEVEL_WARN) std::fputs(text, stderr);
  }, nullptr);
  llama_backend_init();
  llama_model_params mp = llama_model_default_params();
  mp.use_extra_bufts = settings.repack;
  llama_model* model = llama_model_load_from_file(argv[2], mp);
  if (!model) fail(std::string(argv[2]) + ": cannot load");
  const llama_vocab* vocab = llama_model_get_vocab(model);
  const int V = llama_vocab_n_tokens(vocab);

  if (mode == "logits" && argc == 5) {
    auto ids = read_ids(argv[3]);
    llama_context* ctx = context(model, int(ids.size()), settings);
    decode(ctx, ids, 0, int(ids.size()), true);
    std::ofstream out(argv[4], std::ios::binary);
    for (size_t i = 0; i < ids.size(); ++i)
      out.write(reinterpret_cast<const char*>(llama_get_logits_ith(ctx, int(i))), std::streamsize(V * sizeof(float)));
    if (!out) fail(std::string(argv[4]) + ": write failed");
    llama_free(ctx);
  } else if (mode == "greedy" && argc == 5) {
    auto ids = read_ids(argv[3]);
    const int n = std::atoi(argv[4]), prompt = int(ids.size());
    llama_context* ctx = context(model, prompt + n, settings);
    decode(ctx, ids, 0, prompt, false);
    for (int k = 0; k < n; ++k) {
      const float* l = llama_get_logits_ith(ctx, -1);
      int best = 0;
      for (int v = 1; v < V; ++v)
        if (l[v] > l[best]) best = v;
      ids.push_back(best);
      if (k + 1 < n) decode(ctx, ids, int(ids.size()) - 1, int(ids.size()), false);
    }
    for (size_t i = 0; i < ids.size(); ++i) std::printf("%s%d", i ? " " : "", ids[i]);
    std::printf("\n");
    llama_free(ctx);
  } else if ((mode == "tokenize" || mode == "tokenize-as-cli") && argc == 4) {
    const std::string text = slurp(argv[3]);
    std::vector<llama_token> ids(text.size() + 16);
    const bool add_special = mode == "tokenize-as-cli";  // common_tokenize(ctx, prompt, true, true)
    const int n = llama_tokenize(vocab, text.data(), int32_t(text.size()), ids.data(), int32_t(ids.size()),
                                 add_special, true);
    if (n < 0) fail("llama_tokenize failed");
    for (int i = 0; i < n; ++i) std::printf("%s%d", i ? " " : "", ids[size_t(i)]);
    std::printf("\n");
  } else if (mode == "chat" && argc == 4) {
    auto j = nlohmann::ordered_json::parse(slurp(argv[3]));
    common_chat_templates_inputs in;
    for (const auto& m : j) {
      common_chat_msg msg;
      msg.role = m.at("role").get<std::string>();
      msg.content = m.at("content").get<std::string>();
      in.messages.push_back(msg);
    }
    in.add_generation_prompt = true;
    in.use_jinja = true;
    in.enable_thinking = false;
    auto tmpls = common_chat_templates_init(model, "");
    std::fputs(common_chat_templates_apply(tmpls.get(), in).prompt.c_str(), stdout);
  } else {
    fail("unknown mode or wrong arguments: " + mode);
  }
  llama_model_free(model);
  return 0;
}
