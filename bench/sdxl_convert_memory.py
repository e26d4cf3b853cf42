"""Does a full-size SDXL UNet (2.57 B parameters, 10.3 GB in fp32) convert on a 24 GB machine?

    python bench/sdxl_convert_memory.py [OUT_DIR]      # ~4 min on 2 cores, writes ~10 GB to OUT_DIR

Builds the SDXL base UNet with random weights (diffusers' config of stabilityai/stable-diffusion-xl-base-1.0)
and runs the converter's own export and parity gate on it (converters/export.py), sampling the process's
anonymous and total resident memory every 0.2 s. File-backed pages (the memory-mapped weights ONNX Runtime
reads during the parity check) count in VmRSS but the kernel can drop them; anonymous memory is what must
fit. Measured 2026-11-26 on the 2-core, 24 GB machine: export 155 s, parity 28 s (max abs err 3.3e-6),
peak anonymous 14.2 GB, peak VmRSS 21.3 GB.
"""
import re, sys, threading, time, resource
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1]))
import torch
peak = {"anon": 0, "rss": 0}
def sample():
    while True:
        s = open('/proc/self/status').read()
        a = int(re.search(r'RssAnon:\s+(\d+)', s).group(1)) // 1024
        r = int(re.search(r'VmRSS:\s+(\d+)', s).group(1)) // 1024
        peak["anon"], peak["rss"] = max(peak["anon"], a), max(peak["rss"], r)
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()
def log(m): print(f"[{time.strftime('%H:%M:%S')}] {m} | peak anon {peak['anon']} MiB, peak rss {peak['rss']} MiB", flush=True)
from diffusers import UNet2DConditionModel
from converters.components import ComponentSpec, UNetAddedExport, UNET_ADDED, _unet_example, unet_odd_size
from converters.export import export_component, parity_check
torch.manual_seed(0)
unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32).eval()
n = sum(p.numel() for p in unet.parameters())
log(f"built SDXL UNet: {n/1e9:.2f} B params, {n*4/1e9:.1f} GB fp32")
g = torch.Generator().manual_seed(0)
odd = unet_odd_size(unet)
spec = ComponentSpec("unet", UNetAddedExport(unet), UNET_ADDED, _unet_example(unet, 2, odd, odd + 2, 77, g, 1280),
                     [_unet_example(unet, 1, 8, 8, 77, g, 1280)], "model.", "unet")
t = time.time(); path = export_component(spec, sys.argv[1] if len(sys.argv) > 1 else "/tmp/sdxl-unet-export"); log(f"exported in {time.time()-t:.0f} s")
t = time.time(); err = parity_check(spec, path, 1e-3); log(f"parity max abs err {err:.2e} in {time.time()-t:.0f} s")
print("ru_maxrss MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
