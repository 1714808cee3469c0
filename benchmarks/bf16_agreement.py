r"""GIM in bfloat16 against float32 on the pretrained all-MiniLM-L6-v2 (CPU).

For each of the built-in sentences of ``captum-gim compare --model minilm``, ``LayerGIM``
(baseline: ``[PAD]`` at every position) explains the first coordinate of the mean-pooled
sentence embedding, once with the float32 model and once with a bfloat16 copy; the cosine
similarity of the per-token scores says how much half precision changes the explanation.
Captum's ``LayerGradientXActivation`` is measured the same way for reference.

Run: ``.venv/bin/python benchmarks/bf16_agreement.py``
"""
import copy, torch, warnings
warnings.simplefilter("ignore")
import transformers
from captum.attr import LayerGradientXActivation
from captum_gim import LayerGIM
from captum_gim.evaluation.tasks.hf import minilm_path, DEFAULT_PAIRS
torch.set_num_threads(2)
p = minilm_path()
tok = transformers.AutoTokenizer.from_pretrained(str(p))
m32 = transformers.AutoModel.from_pretrained(str(p), attn_implementation="sdpa").eval()
m16 = copy.deepcopy(m32).to(torch.bfloat16)
def fwd(model):
    def f(ids, mask):
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return h.mean(1)[:, :4].float()
    return f
cos_gim, cos_plain = [], []
for a, b in DEFAULT_PAIRS:
    enc = tok(a, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    base = torch.full_like(ids, tok.pad_token_id)
    r = {}
    for name, m in (("32", m32), ("16", m16)):
        g = LayerGIM(fwd(m), m.get_input_embeddings(), model=m).attribute(ids, baselines=base, target=0, additional_forward_args=(mask,)).float().sum(-1)
        pl = LayerGradientXActivation(fwd(m), m.get_input_embeddings()).attribute(ids, target=0, additional_forward_args=(mask,)).float().sum(-1)
        r[name] = (g, pl)
    c = torch.nn.functional.cosine_similarity
    cos_gim.append(float(c(r["32"][0], r["16"][0])))
    cos_plain.append(float(c(r["32"][1], r["16"][1])))
import statistics
print(f"n={len(cos_gim)} GIM bf16 vs fp32 per-token score cosine: min {min(cos_gim):.4f} median {statistics.median(cos_gim):.4f}")
print(f"gradient x activation bf16 vs fp32: min {min(cos_plain):.4f} median {statistics.median(cos_plain):.4f}")
