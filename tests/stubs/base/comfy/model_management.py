"""Stand-in for comfy.model_management: CPU only, records load requests, an interrupt flag for tests."""

import torch


class InterruptProcessingException(Exception):
    pass


interrupt_processing = False
loaded = []  # every list passed to load_models_gpu
memory_requests = []  # and the memory_required of each call


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()


def get_torch_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def module_size(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def load_models_gpu(models, memory_required=0, **kwargs):
    loaded.append(list(models))
    memory_requests.append(memory_required)
    for m in models:
        m.model.to(m.load_device)


def soft_empty_cache(force=False):
    pass
