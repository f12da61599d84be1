"""Every change the engine makes to a library's internals while training, each guarded and undone when training ends."""
