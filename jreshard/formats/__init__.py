"""Source formats. Each module turns a checkpoint into a :class:`jreshard.catalog`-style description:
``dcp`` (torch.distributed.checkpoint directories), ``torchsave`` (torch.save zip archives),
``safetensors`` (single files and sharded indexes)."""
