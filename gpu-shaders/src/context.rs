//! Adapter selection, device creation, buffers, chunked dispatch and readback.

use std::fmt;
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

/// Environment variable that picks an adapter: a case-insensitive substring of the
/// adapter's name, driver, backend (`vulkan`, `metal`, `dx12`, `gl`) or device type
/// (`discrete`, `integrated`, `virtual`, `cpu`).
pub const ADAPTER_ENV: &str = "MERGE_GPU_ADAPTER";

/// Workgroup width of every kernel; chunks are multiples of it so that aligned
/// 256-blocks (the tree-sum subtrees of SPEC.md §3.1) never straddle two chunks.
pub const WORKGROUP: u32 = 256;

/// Everything the GPU runtime can refuse.
#[derive(Debug)]
pub enum GpuError {
    /// No adapter fits: `found` lists every adapter seen, one line each.
    NoAdapter { wanted: Option<String>, found: Vec<String> },
    /// The adapter refused a device, or the device was lost.
    Device(String),
    /// An arithmetic error the CPU reference would also report (non-finite value,
    /// bad hyperparameter, length mismatch).
    Core(merge_core::Error),
    /// A request the runtime cannot serve (e.g. a tensor of 2^32 or more elements).
    Invalid(String),
    /// An earlier step failed part-way on the GPU; the state must be reloaded.
    Poisoned(String),
    /// The device could not allocate a buffer (`what`, `bytes` long).
    OutOfMemory { what: String, bytes: u64 },
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuError::NoAdapter { wanted, found } => {
                match wanted {
                    Some(w) => write!(f, "no GPU adapter matches {ADAPTER_ENV}={w:?}")?,
                    None => write!(f, "no usable GPU adapter")?,
                }
                if found.is_empty() {
                    write!(f, "; none found at all: {}", no_adapter_hint())
                } else {
                    write!(f, "; found:")?;
                    for a in found {
                        write!(f, "\n  {a}")?;
                    }
                    Ok(())
                }
            }
            GpuError::Device(m) => write!(f, "GPU device error: {m}"),
            GpuError::Core(e) => write!(f, "{e}"),
            GpuError::Invalid(m) => write!(f, "{m}"),
            GpuError::Poisoned(m) => write!(f, "optimizer state is no longer valid: {m}"),
            GpuError::OutOfMemory { what, bytes } => write!(
                f,
                "out of GPU memory allocating `{what}` ({:.1} MiB): lower --batch-size or --max-length, train a smaller \
                 model, or use --backend cpu",
                *bytes as f64 / (1u64 << 20) as f64
            ),
        }
    }
}

impl std::error::Error for GpuError {}

impl From<merge_core::Error> for GpuError {
    fn from(e: merge_core::Error) -> Self {
        GpuError::Core(e)
    }
}

/// Why no adapter at all was found, as precisely as the environment tells: a
/// `WGPU_BACKEND` that selects nothing, or a Vulkan driver list that points
/// nowhere, before the generic advice to install a driver.
fn no_adapter_hint() -> String {
    if let Ok(v) = std::env::var("WGPU_BACKEND")
        && wgpu::Backends::from_comma_list(&v).is_empty()
    {
        return format!("WGPU_BACKEND={v:?} selects no backend (vulkan, metal, dx12, gl); unset it or name one");
    }
    for var in ["VK_DRIVER_FILES", "VK_ICD_FILENAMES"] {
        if let Ok(v) = std::env::var(var)
            && let Some(missing) = std::env::split_paths(&v).find(|p| !p.exists())
        {
            return format!("{var} names {}, which does not exist; point it at an installed driver's JSON file or unset it", missing.display());
        }
    }
    "install mesa-vulkan-drivers libvulkan1 (software Vulkan)".to_string()
}

/// Every adapter wgpu sees with the backends `WGPU_BACKEND` selects (the primary
/// ones by default), in wgpu's order: the positions [`GpuOptions::adapter_index`]
/// refers to.
pub fn enumerate_adapters() -> Vec<wgpu::Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle().with_env());
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY)))
}

/// How to open a device.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Overrides [`ADAPTER_ENV`] when set.
    pub adapter: Option<String>,
    /// The adapter at this position of [`enumerate_adapters`], overriding any name:
    /// two adapters can share a name (lavapipe on Vulkan and on GL are both
    /// `llvmpipe`), a position cannot.
    pub adapter_index: Option<usize>,
    /// Upper bound on the bytes of one chunk buffer. The device's own binding
    /// limit applies anyway; tests set this small to prove that results do not
    /// depend on the split.
    pub max_chunk_bytes: Option<u64>,
}

/// One adapter, described for humans and for [`GpuError::NoAdapter`].
pub fn describe(info: &wgpu::AdapterInfo) -> String {
    format!(
        "{} ({:?}, {:?}, driver {} {})",
        info.name, info.backend, info.device_type, info.driver, info.driver_info
    )
}

fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let ty = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    // GL's compute support is the weakest; prefer the native APIs.
    let backend = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (ty, backend)
}

fn matches(info: &wgpu::AdapterInfo, wanted: &str) -> bool {
    let w = wanted.to_lowercase();
    let fields = [
        info.name.to_lowercase(),
        info.driver.to_lowercase(),
        format!("{:?}", info.backend).to_lowercase(),
        format!("{:?}", info.device_type).to_lowercase(),
    ];
    fields.iter().any(|f| f.contains(&w))
}

/// A device with its queue: the one object every kernel runs on.
#[derive(Clone)]
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    /// Private: every submission and queue write goes through [`GpuContext::submit`]
    /// and [`GpuContext::write_buffer`], which first submit the recorded dispatches,
    /// so that nothing overtakes them.
    queue: wgpu::Queue,
    /// Dispatches recorded by [`GpuContext::record`] and not yet submitted (shared
    /// by the clones of a context, which share its queue).
    pending: Arc<Mutex<Pending>>,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    max_chunk_bytes: u64,
}

/// Dispatches per queue submission: large enough that submission overhead
/// vanishes against the kernels, small enough that the device starts on a long
/// forward pass while the host is still recording it.
const RECORD_BATCH: u32 = 64;

#[derive(Default)]
struct Pending {
    enc: Option<wgpu::CommandEncoder>,
    recorded: u32,
}

impl Pending {
    fn take(&mut self) -> Option<wgpu::CommandEncoder> {
        self.recorded = 0;
        self.enc.take()
    }
}

impl GpuContext {
    /// Opens the best adapter (discrete, then integrated, then software), or the
    /// one named by `opts.adapter` / [`ADAPTER_ENV`], with the adapter's own limits.
    pub fn new(opts: &GpuOptions) -> Result<Self, GpuError> {
        let adapters = enumerate_adapters();
        let wanted = match opts.adapter_index {
            Some(i) => Some(format!("#{i}")),
            None => opts.adapter.clone().or_else(|| std::env::var(ADAPTER_ENV).ok().filter(|s| !s.is_empty())),
        };
        let found: Vec<String> = adapters.iter().map(|a| describe(&a.get_info())).collect();
        let mut candidates: Vec<wgpu::Adapter> = adapters
            .into_iter()
            .enumerate()
            .filter(|(i, a)| {
                let info = a.get_info();
                let compute = a.get_downlevel_capabilities().flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS);
                let picked = match opts.adapter_index {
                    Some(at) => *i == at,
                    None => wanted.as_deref().is_none_or(|w| matches(&info, w)),
                };
                compute && picked
            })
            .map(|(_, a)| a)
            .collect();
        candidates.sort_by_key(|a| rank(&a.get_info()));
        let adapter = candidates.into_iter().next().ok_or(GpuError::NoAdapter { wanted, found })?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("merge-gpu"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| GpuError::Device(format!("{}: {e}", describe(&info))))?;
        let device_max = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let mut max_chunk_bytes = device_max;
        if let Some(m) = opts.max_chunk_bytes {
            max_chunk_bytes = max_chunk_bytes.min(m);
        }
        // A chunk holds a whole number of 256-element blocks of 4-byte words.
        let unit = WORKGROUP as u64 * 4;
        max_chunk_bytes = (max_chunk_bytes / unit) * unit;
        if max_chunk_bytes == 0 {
            return Err(GpuError::Invalid(format!(
                "max_chunk_bytes must be at least {unit} bytes (one 256-element block of 4-byte words)"
            )));
        }
        Ok(GpuContext { device, queue, pending: Arc::default(), info, limits, max_chunk_bytes })
    }

    /// The adapter in use.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The limits the device was opened with (the adapter's own).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// Elements of 4 bytes per chunk (a multiple of 256).
    pub fn chunk_elems(&self) -> u64 {
        self.max_chunk_bytes / 4
    }

    /// Splits `n` elements into `(start, len)` chunks of at most [`Self::chunk_elems`].
    pub fn chunks(&self, n: u64) -> Vec<(u64, u64)> {
        let c = self.chunk_elems();
        let mut out = Vec::new();
        let mut s = 0;
        while s < n {
            let len = c.min(n - s);
            out.push((s, len));
            s += len;
        }
        out
    }

    /// Workgroup counts for `n_items` items of 256 threads: 1-D while it fits,
    /// otherwise 2-D (the kernels linearise `wid.y * nwg.x + wid.x`).
    pub fn groups(&self, n_groups: u32) -> (u32, u32) {
        let max = self.limits.max_compute_workgroups_per_dimension.max(1);
        if n_groups <= max { (n_groups.max(1), 1) } else { (max, n_groups.div_ceil(max)) }
    }

    /// [`Self::storage`], or [`GpuError::OutOfMemory`] naming the buffer when the
    /// device cannot hold it (instead of wgpu's uncaptured-error panic).
    pub(crate) fn try_storage(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer, GpuError> {
        self.out_of_memory_as_error(label, bytes, || self.storage(label, bytes))
    }

    /// [`Self::storage_init`] with the same out-of-memory error.
    pub(crate) fn try_storage_init(&self, label: &str, data: &[u8]) -> Result<wgpu::Buffer, GpuError> {
        self.out_of_memory_as_error(label, data.len() as u64, || self.storage_init(label, data))
    }

    fn out_of_memory_as_error(&self, label: &str, bytes: u64, make: impl FnOnce() -> wgpu::Buffer) -> Result<wgpu::Buffer, GpuError> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = make();
        match pollster::block_on(scope.pop()) {
            None => Ok(buf),
            Some(_) => Err(GpuError::OutOfMemory { what: label.to_string(), bytes }),
        }
    }

    pub(crate) fn storage(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    pub(crate) fn storage_init(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        let mut padded;
        let contents = if !data.len().is_multiple_of(4) || data.is_empty() {
            padded = data.to_vec();
            padded.resize(data.len().max(4).next_multiple_of(4), 0);
            &padded[..]
        } else {
            data
        };
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        })
    }

    pub(crate) fn uniform_init(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: data,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        })
    }

    /// Records work into the shared command encoder instead of submitting it on
    /// its own: one queue submission per [`RECORD_BATCH`] dispatches instead of
    /// one each, in the same order, so the results do not change. Submitted by the
    /// next [`GpuContext::submit`], [`GpuContext::write_buffer`], readback or wait.
    pub(crate) fn record(&self, f: impl FnOnce(&mut wgpu::CommandEncoder)) {
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(pending.enc.get_or_insert_with(|| self.device.create_command_encoder(&Default::default())));
        pending.recorded += 1;
        if pending.recorded >= RECORD_BATCH {
            let enc = pending.take();
            drop(pending);
            self.queue.submit(enc.map(|e| e.finish()));
        }
    }

    /// Submits the recorded dispatches, if any.
    pub(crate) fn flush(&self) {
        let enc = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(enc) = enc {
            self.queue.submit([enc.finish()]);
        }
    }

    /// Submits `enc` after everything recorded before it.
    pub(crate) fn submit(&self, enc: wgpu::CommandEncoder) {
        self.flush();
        self.queue.submit([enc.finish()]);
    }

    /// Writes `data` into `buf` at `offset` after everything recorded or submitted
    /// before (a queue write runs ahead of the next submission, so the recorded
    /// dispatches go first).
    pub(crate) fn write_buffer(&self, buf: &wgpu::Buffer, offset: u64, data: &[u8]) {
        self.flush();
        self.queue.write_buffer(buf, offset, data);
    }

    /// Copies `bytes` bytes of `buf` back to the host (waits for the queue).
    pub(crate) fn read_bytes(&self, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>, GpuError> {
        self.read_bytes_at(buf, 0, bytes)
    }

    /// Copies `bytes` bytes of `buf` from byte `offset` (a multiple of 4) back to
    /// the host (waits for the queue).
    pub(crate) fn read_bytes_at(&self, buf: &wgpu::Buffer, offset: u64, bytes: u64) -> Result<Vec<u8>, GpuError> {
        let size = bytes.max(4).next_multiple_of(4);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf, offset, &staging, 0, size);
        self.submit(enc);
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|e| GpuError::Device(format!("readback callback lost: {e}")))?
            .map_err(|e| GpuError::Device(format!("readback map failed: {e}")))?;
        let view = slice.get_mapped_range().map_err(|e| GpuError::Device(format!("readback view: {e:?}")))?;
        let out = view[..bytes as usize].to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }

    pub(crate) fn read_u32(&self, buf: &wgpu::Buffer, n: u64) -> Result<Vec<u32>, GpuError> {
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(buf, n * 4)?))
    }

    /// Blocks until all recorded and submitted work has finished.
    pub fn wait(&self) -> Result<(), GpuError> {
        self.flush();
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| GpuError::Device(format!("poll: {e}")))
    }
}
