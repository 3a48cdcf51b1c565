import sys, time, numpy as np, torch
sys.path.insert(0, ".")
from models.classifier import DigitClassifier, ClassifierConfig
from models.gan import CGAN, ACGAN, CGANConfig, ACGANConfig
dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 30
only = sys.argv[3].split(",") if len(sys.argv) > 3 else None
d = np.load("_scratch_ganchk/mnist5k.npz")
X = torch.tensor(d["x"], dtype=torch.float32).view(-1, 1, 28, 28) / 127.5 - 1
Y = torch.tensor(d["y"])
perm0 = torch.randperm(len(Y), generator=torch.Generator().manual_seed(0))
X, Y = X[perm0].to(dev), Y[perm0].to(dev)  # mnist5k is sorted by label
def opt_step_for(model, dmul=1.0):
    cfg = model.config
    opts = {k: torch.optim.Adam(v, lr=cfg.lr * (dmul if k == "disc" else 1), betas=getattr(cfg, "betas", (0.9, 0.999))) for k, v in model.optimizer_groups().items()}
    def step(n, loss):
        opts[n].zero_grad(); loss.backward(); opts[n].step()
    return step
def epochs_iter(n, bs=64, gen=None):
    perm = torch.randperm(n, device=dev)
    for i in range(0, n - bs + 1, bs):
        yield perm[i:i+bs]
torch.manual_seed(0)
judge = DigitClassifier(ClassifierConfig()).to(dev); st = opt_step_for(judge)
for ep in range(4):
    judge.train()
    for idx in epochs_iter(4000):
        judge.train_step({"x": X[idx], "y": Y[idx]}, st)
judge.eval()
with torch.no_grad():
    acc = (judge(X[4000:]).argmax(-1) == Y[4000:]).float().mean().item()
print(f"judge held-out acc {acc:.3f}", flush=True)
def cond_acc(model):
    c = torch.arange(10, device=dev).repeat_interleave(100)
    with torch.no_grad():
        s = model.sample(c, torch.Generator(device=dev).manual_seed(0))
        return (judge(s).argmax(-1) == c).float().mean().item()
import torch.nn.utils.parametrize as P
def nosn(m):
    P.remove_parametrizations(m.D.embed.table, "weight"); return m
DMUL = {"cgan-ttur": 2.0}
def small(m):
    torch.nn.init.normal_(m.D.embed.table.weight, std=0.02); return m
runs = {
    "cgan-smallemb": lambda: small(CGAN(CGANConfig())),
    "cgan-concat": lambda: CGAN(CGANConfig()),
    "cgan-film": lambda: CGAN(CGANConfig(block="film")),
    "cgan-adain": lambda: CGAN(CGANConfig(block="adain")),
    "acgan": lambda: ACGAN(ACGANConfig()),
    "acgan-noterm2": lambda: ACGAN(ACGANConfig(acgan_term2=False)),
}
for name, mk in runs.items():
    if only and name not in only: continue
    torch.manual_seed(0)
    model = mk().to(dev); st = opt_step_for(model, DMUL.get(name, 1.0)); t = time.time(); steps = 0
    for ep in range(1, epochs + 1):
        model.train()
        for idx in epochs_iter(5000):
            logs = model.train_step({"x": X[idx], "y": Y[idx]}, st); steps += 1
        if ep in (1, 2, 3, 5, 8, 12, 16, 20, 25, 30, 40, 50, 60):
            print(f"{name} ep {ep} steps {steps} t {time.time()-t:.0f}s acc {cond_acc(model):.3f} " + " ".join(f"{k}={v:.3f}" for k, v in logs.items()), flush=True)

if dev == "cpu":
    pass
