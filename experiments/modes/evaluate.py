"""--mode eval: held-out loss of the workdir's newest checkpoint, as one JSON line."""

import json


def run(ctx) -> None:
    cfg = ctx.config()
    from jaxlm.parallel import distributed
    from jaxlm.train import loop
    result = loop.evaluate_checkpoint(cfg, ctx.workdir)
    if distributed.is_main_process():
        print(json.dumps(result))
