"""Exact search stand-ins (brute force); the measured indexes replace this module."""
from pathlib import Path
import numpy as np
class HammingIndex:
    def __init__(self, codes): self.codes = codes
    @classmethod
    def build(cls, codes): return cls(np.asarray(codes, np.uint8))
    def search(self, q, max_distance):
        out = []
        a = self.codes.view(np.uint64).reshape(-1, 4)
        for x in np.asarray(q, np.uint8).reshape(-1, 32):
            d = np.bitwise_count(a ^ x.view(np.uint64)).sum(1)
            ids = np.flatnonzero(d <= max_distance); out.append((ids, d[ids]))
        return out
    def save(self, folder): np.save(Path(folder) / "hamming.n.npy", np.array([len(self.codes)]))
    @classmethod
    def load(cls, folder, codes):
        n = int(np.load(Path(folder) / "hamming.n.npy")[0]); assert n == len(codes); return cls(np.asarray(codes))
    def __len__(self): return len(self.codes)
class VectorIndex:
    def __init__(self, v): self.v = v
    @classmethod
    def build(cls, v, seed=0): return cls(np.asarray(v, np.float32))
    def search(self, q, k):
        s = np.asarray(q, np.float32) @ self.v.T
        k = min(k, s.shape[1]); ids = np.argsort(-s, axis=1)[:, :k]
        return ids, np.take_along_axis(s, ids, 1)
    def save(self, folder): np.save(Path(folder) / "vector.n.npy", np.array([len(self.v)]))
    @classmethod
    def load(cls, folder, v): return cls(np.asarray(v))
    def __len__(self): return len(self.v)
