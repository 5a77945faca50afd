"""The tensor contract (DESIGN section 3) in one place: names the shells, client and tests share."""

# Public API of `ensemble` (also accepted by `qwen3_language` for text-only requests).
TEXT_INPUT = "text_input"        # BYTES [1]
IMAGES = "images"                # BYTES [-1], optional: encoded image files in prompt order
MAX_TOKENS = "max_tokens"        # INT32 [1], optional
TEMPERATURE = "temperature"      # FP32 [1], optional, 0 = greedy
TOP_P = "top_p"                  # FP32 [1], optional
TOP_K = "top_k"                  # INT32 [1], optional
SEED = "seed"                    # UINT64 [1], optional
STREAM = "stream"                # BOOL [1], optional
TEXT_OUTPUT = "text_output"      # BYTES [1]
OUTPUT_IDS = "output_ids"        # INT32 [-1]
FINISH_REASON = "finish_reason"  # BYTES [1]: stop, length, cancelled, or empty while streaming

# Encoder -> language (inside the ensemble and between servers).
VISUAL_EMBEDS = "visual_embeds"        # model dtype [N, H]
DEEPSTACK_EMBEDS = "deepstack_embeds"  # model dtype [L, N, H]
IMAGE_GRID_THW = "image_grid_thw"      # INT64 [k, 3]


# Triton data type of each model dtype name, for the E->L tensors.
TRITON_DTYPE = {"float32": "TYPE_FP32", "bfloat16": "TYPE_BF16", "float16": "TYPE_FP16"}

# The language model's request inputs. Inside the ensemble they travel through the encoder
# step unchanged: Triton requires every input of a step that follows a decoupled step (the
# batching encoder) to come from that step, not straight from the ensemble's inputs.
LANGUAGE_REQUEST_INPUTS = (TEXT_INPUT, MAX_TOKENS, TEMPERATURE, TOP_P, TOP_K, SEED, STREAM)
