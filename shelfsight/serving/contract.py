"""The Triton contract in names, written once: the public inputs and outputs of `pipeline` and
`pipeline_stream`, and the tensors `preprocess` hands to `generate`.

Imported by the client side (shelfsight/serving/pipeline.py), the model adapters (model_repository/*/1/model.py)
and the repository builder (export/repository.py), which renders the parameter inputs of the ensemble
configs from here. Only names and types: no Triton, tritonclient or numpy import, so it loads anywhere.
"""
from __future__ import annotations

from shelfsight import params

UNARY, STREAM = "pipeline", "pipeline_stream"
ANSWERS_FROM = {UNARY: "collect", STREAM: "generate"}  # the ensemble's second step

# Public inputs, two forms. The classic one: IMAGE (one encoded file) + QUESTION [+ SYSTEM]. A
# conversation: MESSAGES (shelfsight/conversation.py's JSON: turns of texts and picture places) with its
# pictures as IMAGES (every encoded file, concatenated in order) + IMAGE_SIZES (each file's length).
# Each generation parameter is an optional input named FIELD.upper() (params.RULES).
IMAGE, QUESTION, SYSTEM, ENHANCE = "IMAGE", "QUESTION", "SYSTEM", "ENHANCE"
MESSAGES, IMAGES, IMAGE_SIZES = "MESSAGES", "IMAGES", "IMAGE_SIZES"
# Optional, both forms: RESPONSE_FORMAT (shelfsight/formats.py's JSON: {"kind", "spec"}) constrains the
# answer; STOP (a JSON list of strings) ends it before the first stop sequence.
RESPONSE_FORMAT, STOP = "RESPONSE_FORMAT", "STOP"
# request field -> (input name, Triton data type), the optional inputs in contract order
OPTIONAL: dict[str, tuple[str, str]] = {
    **{field: (field.upper(), rule.triton_type) for field, rule in params.RULES.items()},
    "enhance": (ENHANCE, "BOOL"),
}
PARAMETER_INPUTS = tuple(OPTIONAL[field][0] for field in params.FIELDS)

# Public outputs, every response of either model: the text (a delta when streamed), the counts so far
# and, on the last response, why generation ended ("stop" | "length"; "" before that).
TEXT, PROMPT_TOKENS, COMPLETION_TOKENS, FINISH_REASON = "TEXT", "PROMPT_TOKENS", "COMPLETION_TOKENS", "FINISH_REASON"
OUTPUTS = (TEXT, PROMPT_TOKENS, COMPLETION_TOKENS, FINISH_REASON)

# preprocess -> generate (and collect): model inputs, then the resolved GenerationParams as one JSON
# string (GenerationParams.to_json), so adding a parameter touches no config. Per request:
# input_ids [L], pixels [N] uint8 (every picture resized, H x W x 3 each, in order; 0 bytes without
# pictures: `generate` cuts and normalizes the patches on its device), image_grid_thw [n, 3], image_key [n].
INPUT_IDS, PIXELS, IMAGE_GRID_THW, IMAGE_KEY = "input_ids", "pixels", "image_grid_thw", "image_key"
MODEL_INPUTS = (INPUT_IDS, PIXELS, IMAGE_GRID_THW, IMAGE_KEY)
PARAMS = "params"
STEP_FORMAT, STEP_STOP = "response_format", "stop"  # the checked RESPONSE_FORMAT and STOP ("" when absent)
STEP_INPUTS = MODEL_INPUTS + (PARAMS, STEP_FORMAT, STEP_STOP)

# Triton API data type -> config.pbtxt data type
CONFIG_TYPE = {"BOOL": "TYPE_BOOL", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "FP32": "TYPE_FP32",
               "BYTES": "TYPE_STRING", "UINT8": "TYPE_UINT8"}

# The retrieval models, laid out when the repository serves them (`export repository --embedding DIR
# --reranker DIR`). One input per request, all inputs batch-first; pictures as in the pipeline's
# conversation form (IMAGES + IMAGE_SIZES). Optional inputs left out take the defaults; clients that
# send every input (empty where unused) batch together in Triton's dynamic batcher.
#   embed   CONTENT BYTES [1] (text, may be empty), pictures, INSTRUCTION BYTES [1], DIMENSIONS INT32 [1]
#           (a Matryoshka size; 0 = full) -> EMBEDDING FP32 [d] (unit norm), PROMPT_TOKENS INT32 [1]
#   rerank  QUERY BYTES [1], DOCUMENT BYTES [1], pictures (the first QUERY_IMAGES INT32 [1] are the
#           query's, the rest the document's), INSTRUCTION -> SCORE FP32 [1] in (0, 1), PROMPT_TOKENS
EMBED, RERANK = "embed", "rerank"
CONTENT, INSTRUCTION, DIMENSIONS = "CONTENT", "INSTRUCTION", "DIMENSIONS"
QUERY, DOCUMENT, QUERY_IMAGES = "QUERY", "DOCUMENT", "QUERY_IMAGES"
EMBEDDING, SCORE = "EMBEDDING", "SCORE"
ENCODER_KIND = {EMBED: "embedding", RERANK: "reranker"}
