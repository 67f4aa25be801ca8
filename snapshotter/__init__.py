"""lazysnap: a containerd remote snapshotter that serves eStargz layers lazily over FUSE."""

__version__ = "0.1.0"
