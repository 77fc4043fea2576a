"""A seconds-sized config for engine tests: a random tiny ViT on a generated ImageFolder tree."""
from jdd import config as jc


def get_config(arg=None):
    a = jc.parse_arg(arg, data="", method="clp", param="pyramid", source="cache", steps=6, devices=0,
                     learn_labels=False, evaluate=False, chunks=1, init="noise")
    c = jc.base_config()
    jc.use_data(c, "", a.data)
    c.backbone.spec = "random:dinov2/test"
    c.data.real_res, c.data.crop_res = 36, 32
    c.data.workers = 1
    c.syn.res = 32
    c.syn.param = a.param
    c.syn.extent = 2
    c.syn.init = a.init
    c.syn.learn_labels = a.learn_labels
    c.steps = a.steps
    c.log_every = 2
    c.ckpt_every = 2
    c.augment.copies = 2
    c.augment.accum_chunks = a.chunks
    jc.set_method(c, a.method)
    c.real.source = a.source
    c.real.per_class = 2
    c.parallel.num_devices = a.devices
    c.eval.enabled = a.evaluate
    c.eval.mode = "features"
    c.eval.epochs = 20
    c.eval.seeds = 2
    return c.lock()
