import sys, time, torch
sys.path.insert(0, ".")
torch.set_num_threads(2)
from models.gan import CGAN, ACGAN, CGANConfig, ACGANConfig
for mk in (lambda: CGAN(CGANConfig()), lambda: CGAN(CGANConfig(block="film")), lambda: ACGAN(ACGANConfig())):
    m = mk(); opts = {k: torch.optim.Adam(v, lr=2e-4, betas=(0.5, 0.999)) for k, v in m.optimizer_groups().items()}
    def st(n, l): opts[n].zero_grad(); l.backward(); opts[n].step()
    b = {"x": torch.rand(64, 1, 28, 28) * 2 - 1, "y": torch.randint(0, 10, (64,))}
    for _ in range(3): m.train_step(b, st)
    t = time.time()
    for _ in range(20): m.train_step(b, st)
    dt = (time.time() - t) / 20
    print(type(m).__name__, m.config.block, f"{dt*1000:.0f} ms/step (2 threads) -> {dt*938/60:.1f} min per 60k-MNIST epoch", flush=True)
