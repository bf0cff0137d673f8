//! Python bindings of the umerge engine (`umerge._core`): argument conversion, errors mapped to
//! Python exceptions, heavy work with the GIL released (`py.detach`). No merge logic lives here.

use std::path::Path;
use std::sync::Mutex;

use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyTuple, PyType};

use umerge_core::params::{ParamMap, Params};
use umerge_core::{Error, MergeSpec};

pyo3::create_exception!(_core, UmergeError, PyException, "Base class of every error umerge raises on purpose.");

static INPUT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// `InputError(UmergeError, ValueError)`: created at import (PyO3 exceptions have one base).
fn input_error(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    INPUT_ERROR
        .get_or_try_init(py, || -> PyResult<Py<PyType>> {
            let bases = PyTuple::new(py, [py.get_type::<UmergeError>().into_any(), py.get_type::<PyValueError>().into_any()])?;
            let dict = PyDict::new(py);
            dict.set_item("__doc__", "Bad input or options: a message saying what is wrong and where.")?;
            dict.set_item("__module__", "umerge._core")?;
            let cls = py.import("builtins")?.getattr("type")?.call1(("InputError", bases, dict))?;
            Ok(cls.cast_into::<PyType>()?.unbind())
        })
        .map(|t| t.bind(py))
}

fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let msg = e.to_string();
    if e.is_input() {
        match input_error(py) {
            Ok(t) => PyErr::from_type(t.clone(), msg),
            Err(err) => err,
        }
    } else {
        UmergeError::new_err(msg)
    }
}

/// Runs `work` with the GIL released, giving it a progress callback that calls `progress(
/// tensors_done, tensors_total, bytes_done, bytes_total)` (when given) and checks for Ctrl-C; an
/// exception raised there cancels the work and is re-raised. Returns the report as JSON.
fn run_reported<R, F>(py: Python<'_>, progress: Option<Py<PyAny>>, work: F) -> PyResult<String>
where
    R: serde::Serialize + Send,
    F: for<'a> FnOnce(umerge_core::Progress<'a>) -> Result<R, Error> + Send,
{
    let pending: Mutex<Option<PyErr>> = Mutex::new(None);
    let cb = |t: u64, tt: u64, b: u64, bt: u64| -> bool {
        Python::attach(|py| {
            let r = py.check_signals().and_then(|_| match &progress {
                Some(p) => p.call1(py, (t, tt, b, bt)).map(|_| ()),
                None => Ok(()),
            });
            match r {
                Ok(()) => true,
                Err(e) => {
                    if let Ok(mut slot) = pending.lock() {
                        *slot = Some(e);
                    }
                    false
                }
            }
        })
    };
    let result = py.detach(|| work(&cb));
    match result {
        Ok(report) => serde_json::to_string(&report).map_err(|e| UmergeError::new_err(e.to_string())),
        Err(Error::Cancelled) => match pending.lock().ok().and_then(|mut s| s.take()) {
            Some(e) => Err(e),
            None => Err(UmergeError::new_err("cancelled")),
        },
        Err(e) => Err(to_py(py, e)),
    }
}

/// Runs a merge from a JSON spec; returns the report as JSON. `progress(tensors_done,
/// tensors_total, bytes_done, bytes_total)` is called after each tensor; an exception raised in
/// it (or Ctrl-C) cancels the merge and is re-raised.
#[pyfunction]
#[pyo3(signature = (spec_json, progress=None))]
fn merge(py: Python<'_>, spec_json: &str, progress: Option<Py<PyAny>>) -> PyResult<String> {
    let spec = MergeSpec::from_json(spec_json).map_err(|e| to_py(py, e))?;
    run_reported(py, progress, |cb| umerge_core::merge(&spec, Some(cb)))
}

/// Folds LoRA adapters into their base from a JSON spec (`umerge_core::fold::FoldSpec`);
/// returns the report as JSON. Progress and cancellation as in `merge`.
#[pyfunction]
#[pyo3(signature = (spec_json, progress=None))]
fn fold(py: Python<'_>, spec_json: &str, progress: Option<Py<PyAny>>) -> PyResult<String> {
    let spec = umerge_core::fold::FoldSpec::from_json(spec_json).map_err(|e| to_py(py, e))?;
    run_reported(py, progress, |cb| umerge_core::fold::fold(&spec, Some(cb)))
}

/// Fake-quantizes a checkpoint (int4/int8 round to nearest, group-wise symmetric, dequantized in
/// its own dtype) from a JSON spec (`umerge_core::quantize::QuantizeSpec`); returns the report as
/// JSON. Progress and cancellation as in `merge`.
#[pyfunction]
#[pyo3(signature = (spec_json, progress=None))]
fn quantize(py: Python<'_>, spec_json: &str, progress: Option<Py<PyAny>>) -> PyResult<String> {
    let spec = umerge_core::quantize::QuantizeSpec::from_json(spec_json).map_err(|e| to_py(py, e))?;
    run_reported(py, progress, |cb| umerge_core::quantize::quantize(&spec, Some(cb)))
}

/// Extracts a LoRA adapter from a fine-tune and its base from a JSON spec
/// (`umerge_core::extract::ExtractSpec`); returns the report as JSON (the merge report's fields,
/// `modules` and `skipped`). Progress and cancellation as in `merge`.
#[pyfunction]
#[pyo3(signature = (spec_json, progress=None))]
fn extract_lora(py: Python<'_>, spec_json: &str, progress: Option<Py<PyAny>>) -> PyResult<String> {
    let spec = umerge_core::extract::ExtractSpec::from_json(spec_json).map_err(|e| to_py(py, e))?;
    run_reported(py, progress, |cb| umerge_core::extract::extract(&spec, Some(cb)))
}

/// Verifies a checkpoint (headers, index, sizes, optional NaN/Inf scan, sha256 against the
/// recipe); returns the report as JSON (see `umerge_core::verify`).
#[pyfunction]
#[pyo3(signature = (path, scan_nonfinite=false, hash=true))]
fn verify(py: Python<'_>, path: &str, scan_nonfinite: bool, hash: bool) -> PyResult<String> {
    let p = path.to_string();
    let opts = umerge_core::verify::VerifyOptions { scan_nonfinite, hash };
    let r = py.detach(|| umerge_core::verify::verify(Path::new(&p), &opts));
    serde_json::to_string(&r).map_err(|e| UmergeError::new_err(e.to_string()))
}

/// Describes a checkpoint as JSON (see `umerge_core::checkpoint::inspect`).
#[pyfunction]
fn inspect(py: Python<'_>, path: &str) -> PyResult<String> {
    let p = path.to_string();
    let v = py.detach(|| umerge_core::checkpoint::inspect(Path::new(&p)));
    serde_json::to_string(&v).map_err(|e| UmergeError::new_err(e.to_string()))
}

fn f32_from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Merges float32 arrays in memory (given as little-endian bytes) with `method` as one tensor;
/// `params_json` = {"global": {...}, "models": [{...}, ...]}. Returns float32 bytes.
#[pyfunction]
#[pyo3(signature = (method, params_json, base, models, threads=None))]
fn merge_arrays<'py>(
    py: Python<'py>,
    method: &str,
    params_json: &str,
    base: Option<&[u8]>,
    models: Vec<Vec<u8>>,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyBytes>> {
    #[derive(serde::Deserialize)]
    struct P {
        #[serde(default)]
        global: ParamMap,
        #[serde(default)]
        models: Vec<ParamMap>,
    }
    let p: P = serde_json::from_str(params_json).map_err(|e| to_py(py, Error::Spec(format!("invalid parameters: {e}"))))?;
    let params = Params { global: p.global, models: p.models };
    let base_v = base.map(f32_from_bytes);
    let method = method.to_string();
    let result = py.detach(move || -> Result<Vec<f32>, Error> {
        let model_v: Vec<Vec<f32>> = models.iter().map(|m| f32_from_bytes(m)).collect();
        let views: Vec<&[f32]> = model_v.iter().map(|v| v.as_slice()).collect();
        let pool = rayon_pool(threads)?;
        pool.install(|| {
            umerge_core::exec::merge_in_memory(&method, &params, base_v.as_deref(), &views, "array", umerge_core::exec::MAX_CHUNK, u64::MAX)
        })
    });
    let out = result.map_err(|e| to_py(py, e))?;
    let bytes: Vec<u8> = out.iter().flat_map(|x| x.to_le_bytes()).collect();
    Ok(PyBytes::new(py, &bytes))
}

fn rayon_pool(threads: Option<usize>) -> Result<umerge_core::exec::Pool, Error> {
    umerge_core::exec::pool(threads)
}

/// The engine's version.
#[pyfunction]
fn version() -> &'static str {
    umerge_core::VERSION
}

/// Names of the merge methods this build knows.
#[pyfunction]
fn methods() -> Vec<&'static str> {
    umerge_core::methods::METHODS.to_vec()
}

/// The methods and their documented parameters, as JSON:
/// `[{"name", "base", "params": [{"name", "per_model", "default", "doc"}]}]`.
///
/// A method is built with empty parameters for 1, 2 or 3 models (methods check their model
/// count) only to read its `ParamSpec`s; nothing is merged.
#[pyfunction]
fn method_info() -> String {
    use umerge_core::methods::{build, BaseUse, METHODS};
    let mut out = Vec::new();
    for &name in METHODS {
        let built = (1..=3).find_map(|n| {
            let p = Params { global: ParamMap::new(), models: vec![ParamMap::new(); n] };
            build(name, &p).ok()
        });
        let Some(m) = built else { continue };
        let params: Vec<serde_json::Value> = m
            .params()
            .iter()
            .map(|p| serde_json::json!({"name": p.name, "per_model": p.per_model, "default": p.default, "doc": p.doc}))
            .collect();
        let base = match m.base_use() {
            BaseUse::Required => "required",
            BaseUse::Optional => "optional",
            BaseUse::Unused => "unused",
        };
        out.push(serde_json::json!({"name": name, "base": base, "params": params}));
    }
    // passthrough copies instead of merging, so it is not a `Method`; listed so users find it.
    out.push(serde_json::json!({"name": "passthrough", "base": "refused", "params": [{
        "name": "scale", "per_model": true, "default": "1.0",
        "doc": "factor each copied tensor is multiplied by (filter rules pick tensors: 0 zeroes o_proj, say)",
    }]}));
    serde_json::Value::Array(out).to_string()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("UmergeError", py.get_type::<UmergeError>())?;
    m.add("InputError", input_error(py)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(fold, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(extract_lora, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(merge_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(methods, m)?)?;
    m.add_function(wrap_pyfunction!(method_info, m)?)?;
    Ok(())
}
