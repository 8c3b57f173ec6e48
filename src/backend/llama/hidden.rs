//! A model's hidden states, read while a prompt is evaluated: llama.cpp's eval callback (the
//! hook its `imatrix` and `eval-callback` tools use) is shown every tensor of the graph, and
//! asks for the output of each wanted layer (`l_out-N`), which it copies as it is computed.
//! The callback asks for nothing unless a capture is on, so evaluations without one run the
//! graph exactly as before.

use std::cell::UnsafeCell;
use std::ffi::{CStr, c_void};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_sys_2 as sys;

use crate::backend::BackendError;

/// The wanted layers' outputs of the decode calls made while it is on.
#[derive(Default)]
struct State {
    on: bool,
    n_embd: usize,
    /// `l_out-N` of each wanted layer, and the rows captured (`n_embd` values each).
    layers: Vec<(Vec<u8>, Vec<f32>)>,
    error: Option<String>,
}

/// The state the callback writes, at a fixed address for the context's lifetime.
pub(super) struct Capture(Box<UnsafeCell<State>>);

impl Capture {
    pub fn new(n_embd: usize) -> Self {
        Self(Box::new(UnsafeCell::new(State {
            n_embd,
            ..State::default()
        })))
    }

    /// `params` with the callback installed, writing to this capture.
    ///
    /// llama-cpp-2 (pinned at 0.1.160) has no setter for `cb_eval`; its context parameters
    /// are a struct of one field, llama.cpp's `llama_context_params`, which is written here
    /// in place. The sizes are checked when this compiles, and the layout by reading back
    /// fields through the crate's own getters; a mismatch is an error, never a guess.
    pub fn install(
        &self,
        mut params: LlamaContextParams,
    ) -> Result<LlamaContextParams, BackendError> {
        const _: () = assert!(
            std::mem::size_of::<LlamaContextParams>()
                == std::mem::size_of::<sys::llama_context_params>()
        );
        let raw = std::ptr::from_mut(&mut params).cast::<sys::llama_context_params>();
        // SAFETY: same size (checked above) and the one field at offset 0 (checked below
        // before anything is written); `raw` points into `params`, alive here.
        let same = unsafe {
            (*raw).n_batch == params.n_batch()
                && (*raw).n_ubatch == params.n_ubatch()
                && (*raw).n_threads == params.n_threads()
                && (*raw).n_seq_max == params.n_seq_max()
        };
        if !same {
            return Err(BackendError::Job(
                "this build cannot install llama.cpp's eval callback (context parameters laid out otherwise)".into(),
            ));
        }
        // SAFETY: as above; the user data is the boxed state, which outlives the context
        // (the session owns both, and the callback runs only inside its decode calls).
        unsafe {
            (*raw).cb_eval = Some(on_tensor);
            (*raw).cb_eval_user_data = self.0.get().cast::<c_void>();
        }
        Ok(params)
    }

    /// Start capturing the outputs of `layers` (indices) in the decode calls that follow.
    pub fn start(&mut self, layers: &[u32]) {
        let s = self.0.get_mut();
        s.on = true;
        s.error = None;
        s.layers = layers
            .iter()
            .map(|l| (format!("l_out-{l}").into_bytes(), Vec::new()))
            .collect();
    }

    /// Stop, and hand back each wanted layer's rows (in the order of `start`), each row
    /// `n_embd` values, in the order they were computed.
    pub fn finish(&mut self) -> Result<Vec<Vec<f32>>, BackendError> {
        let s = self.0.get_mut();
        s.on = false;
        if let Some(e) = s.error.take() {
            return Err(BackendError::Decode(e));
        }
        Ok(std::mem::take(&mut s.layers)
            .into_iter()
            .map(|(_, rows)| rows)
            .collect())
    }

    pub fn n_embd(&mut self) -> usize {
        self.0.get_mut().n_embd
    }
}

/// Called by ggml's scheduler for every tensor of the graph: first to ask whether its data
/// is wanted (`ask`), then, for a wanted one, once it is computed. Returning `false` from
/// the second call would abort the computation, so it always returns `true` there.
unsafe extern "C" fn on_tensor(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    // SAFETY: `user` is the capture's state (installed with the callback), only touched
    // here and by the session between decode calls, on the same thread.
    let s = unsafe { &mut *user.cast::<State>() };
    if !s.on || t.is_null() {
        return !ask;
    }
    // SAFETY: ggml hands a valid tensor whose name is a NUL-terminated array.
    let name = unsafe { CStr::from_ptr((*t).name.as_ptr()) }.to_bytes();
    let Some(at) = s.layers.iter().position(|(n, _)| n == name) else {
        return !ask;
    };
    if ask {
        return true;
    }
    // SAFETY: a computed tensor of the graph; its shape and strides are plain fields.
    let (ty, ne, nb) = unsafe { ((*t).type_, (*t).ne, (*t).nb) };
    let (cols, rows) = (ne[0] as usize, ne[1].max(0) as usize);
    let contiguous = nb[0] == 4 && nb[1] == 4 * cols && ne[2] == 1 && ne[3] == 1;
    if ty != sys::GGML_TYPE_F32 || cols != s.n_embd || !contiguous {
        s.error.get_or_insert_with(|| {
            format!(
                "layer output {} is not {} contiguous f32 values a row",
                String::from_utf8_lossy(name),
                s.n_embd
            )
        });
        return true;
    }
    let out = &mut s.layers[at].1;
    let from = out.len();
    out.resize(from + cols * rows, 0.0);
    // SAFETY: the destination holds exactly the tensor's `cols × rows` f32 values, and the
    // tensor is computed and allocated (this is the callback's second call).
    unsafe {
        sys::ggml_backend_tensor_get(
            t,
            out[from..].as_mut_ptr().cast::<c_void>(),
            0,
            cols * rows * 4,
        );
    }
    true
}

/// What one prompt's evaluation captured, and where its rows sit in the prompt.
pub(super) struct States<'a> {
    /// The captured layers' indices, in the order of `rows`.
    pub layers: &'a [u32],
    pub rows: &'a [Vec<f32>],
    pub n_embd: usize,
    pub n_layer: u32,
    /// The first position evaluated (the ones before were reused from the KV cache).
    pub evaluated_from: usize,
    /// The first of the row's own positions (after the prefix every row shares).
    pub own_from: usize,
    pub n: usize,
}

impl States<'_> {
    /// A hidden-state task's output: each state, in order.
    pub fn pooled(
        &self,
        states: &[crate::spec::HiddenState],
    ) -> Result<crate::backend::TaskOutput, BackendError> {
        let start = std::time::Instant::now();
        let mut out = Vec::with_capacity(states.len() * self.n_embd);
        for s in states {
            let index = s.layer.index(self.n_layer);
            let at = self
                .layers
                .iter()
                .position(|&x| x == index)
                .ok_or_else(|| BackendError::Job(format!("layer {index} was not captured")))?;
            let rows = &self.rows[at];
            let n_rows = rows.len() / self.n_embd.max(1);
            let row = |i: usize| &rows[i * self.n_embd..(i + 1) * self.n_embd];
            {
                match s.pool {
                    // The last row computed is the prompt's last position, in every layer
                    // (the last layer computes only the rows whose logits are read, the
                    // last of each call among them).
                    crate::spec::Pooling::Last => {
                        let Some(last) = n_rows.checked_sub(1) else {
                            return Err(BackendError::Job(format!(
                                "layer {index}: no state captured"
                            )));
                        };
                        out.extend_from_slice(row(last));
                    }
                    crate::spec::Pooling::Mean => {
                        if n_rows != self.n - self.evaluated_from {
                            return Err(BackendError::Job(format!(
                                "layer {index}: {n_rows} states captured for {} evaluated tokens",
                                self.n - self.evaluated_from
                            )));
                        }
                        let from = self.own_from.max(self.evaluated_from);
                        let count = (self.n - from).max(1);
                        let mut mean = vec![0f64; self.n_embd];
                        for p in from..self.n {
                            for (m, x) in mean.iter_mut().zip(row(p - self.evaluated_from)) {
                                *m += f64::from(*x);
                            }
                        }
                        out.extend(mean.iter().map(|m| (m / count as f64) as f32));
                    }
                }
            }
        }
        Ok(crate::backend::TaskOutput {
            text: None,
            logprobs: None,
            choice_tokens: None,
            hidden: Some(out),
            gen_tokens: 0,
            finish: crate::backend::Finish::Scored,
            decode_ms: start.elapsed().as_secs_f64() * 1000.0,
        })
    }
}
