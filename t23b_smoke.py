import torch, sys, tempfile
from pathlib import Path
from engine.model.tiny import make_tiny_model
from engine.model import load_model
from transformers import AutoModelForCausalLM
from engine.model.arch import FAMILIES
f = FAMILIES["qwen3_5_moe"]; c = f.published_config(); fa = f.facts(c)
print(type(c).__name__, fa.num_layers, len(fa.moe_layers), fa.num_experts, fa.top_k, fa.expert_params*4.13/8/1e9)
for fam in sys.argv[1:]:
    d = Path(tempfile.mkdtemp())/fam
    make_tiny_model(fam, d)
    ours = load_model(d).model
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    print(fam, torch.equal(a, b), (a-b).abs().max().item(), d)
