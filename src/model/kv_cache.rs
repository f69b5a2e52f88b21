//! One key/value cache per sequence: plain growable f32 buffers, laid out
//! [position][kv_head][head_dim] per layer, so appending a token is a copy and
//! attention reads contiguous rows.

#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    row: usize,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct LayerCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl KvCache {
    /// `row` = kv_heads × head_dim, the floats one position takes per layer.
    pub fn new(num_layers: usize, row: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); num_layers],
            len: 0,
            row,
        }
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn layer(&self, l: usize) -> &LayerCache {
        &self.layers[l]
    }

    /// Appends `k`/`v` rows for layer `l`; positions become visible with `commit`.
    pub(crate) fn append(&mut self, l: usize, k: &[f32], v: &[f32]) {
        debug_assert_eq!(k.len() % self.row, 0);
        let layer = &mut self.layers[l];
        layer.k.extend_from_slice(k);
        layer.v.extend_from_slice(v);
    }

    /// Marks `n` appended positions as cached in every layer.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
    }

    /// Drops everything after `len` positions (used to roll back a failed step).
    pub fn truncate(&mut self, len: usize) {
        for layer in &mut self.layers {
            layer.k.truncate(len * self.row);
            layer.v.truncate(len * self.row);
        }
        self.len = self.len.min(len);
    }
}
