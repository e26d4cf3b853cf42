"""Every limit sdonnx enforces on what a user or a file can ask for, in one place, for every door
(Python, CLI, HTTP API). Each is checked before anything large is allocated; crossing one is a clear
error naming the limit."""

# a .pt/.ckpt file may unpack to at most this many times its size on disk (torch stores tensors uncompressed)
TORCH_FILE_MAX_EXPANSION = 4
# ...but a small file may always unpack to this many bytes (tiny embeddings, hand-made test files)
TORCH_FILE_MIN_BUDGET = 1 << 20

# bytes of a model folder's sdonnx.json (an SDXL manifest with its weight-name maps is about 1 MB)
MAX_MANIFEST_BYTES = 64 << 20

# pixels of an image decoded from a file or a request (init image, mask, PNG info): 8192x8192, 256 MiB as RGBA
MAX_IMAGE_PIXELS = 8192 * 8192

# characters in one prompt (positive or negative, before AND/BREAK splitting): about 50 chunks of 75 tokens
MAX_PROMPT_CHARS = 20_000
# brackets open at once in a prompt, `(` and `[` together; A1111 prompts rarely nest past 10
MAX_PROMPT_NESTING = 32
