"""2-process Accelerate run on CPU (debug_launcher); writes merged values to $RESULT_PATH."""


import torch.nn.functional as F
from torch.utils.data import DataLoader


def train_fn():
    from accelerate import Accelerator

    from inrun_shapley import IndexedDataset
    from inrun_shapley.callbacks import ShapleyHook
    from tests.callbacks.integration_setup import data, make_model, make_optimizer, write_result

    train, val = data()
    accelerator = Accelerator(cpu=True)
    model = make_model()
    opt = make_optimizer(model.parameters())
    loader = DataLoader(IndexedDataset(train), batch_size=4, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    hook = ShapleyHook(accelerator, model, opt, val_data=val)
    for _ in range(2):
        for batch in loader:
            with hook.batch(batch):
                x, y = batch
                accelerator.backward(F.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
    hook.close()
    if accelerator.is_main_process:
        write_result(hook)


if __name__ == "__main__":
    from accelerate import debug_launcher

    debug_launcher(train_fn, num_processes=2)
