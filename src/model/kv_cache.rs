//! One key/value cache per sequence: plain growable f32 buffers, laid out
//! [position][kv_head][head_dim] per layer, so appending a token is a copy and
//! attention reads contiguous rows. A step may also leave *branches*:
//! candidate rows for the next position, of which the caller keeps one.

#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    row: usize,
    /// Keys/values of the last step's branch rows (candidates for the next
    /// position), per layer: held apart until one is kept.
    branches: Vec<LayerCache>,
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
            branches: vec![LayerCache::default(); num_layers],
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

    /// Drops everything after `len` positions (used to roll back a failed
    /// step), and any branches.
    pub fn truncate(&mut self, len: usize) {
        for layer in &mut self.layers {
            layer.k.truncate(len * self.row);
            layer.v.truncate(len * self.row);
        }
        self.len = self.len.min(len);
        self.clear_branches();
    }

    /// Holds branch rows' `k`/`v` for layer `l` (one row per branch).
    pub(crate) fn append_branches(&mut self, l: usize, k: &[f32], v: &[f32]) {
        let layer = &mut self.branches[l];
        layer.k.extend_from_slice(k);
        layer.v.extend_from_slice(v);
    }

    pub(crate) fn clear_branches(&mut self) {
        for layer in &mut self.branches {
            layer.k.clear();
            layer.v.clear();
        }
    }

    /// Branches held from the last step.
    pub fn branch_count(&self) -> usize {
        self.branches.first().map_or(0, |b| b.k.len() / self.row)
    }

    /// Makes branch `i` of the last step the next cached position and drops
    /// the others.
    pub fn keep_branch(&mut self, i: usize) -> anyhow::Result<()> {
        let count = self.branch_count();
        anyhow::ensure!(i < count, "branch {i} of {count}");
        let row = self.row;
        for (layer, branch) in self.layers.iter_mut().zip(&self.branches) {
            layer.k.extend_from_slice(&branch.k[i * row..][..row]);
            layer.v.extend_from_slice(&branch.v[i * row..][..row]);
        }
        self.len += 1;
        self.clear_branches();
        Ok(())
    }
}
