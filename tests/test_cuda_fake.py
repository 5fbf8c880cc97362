"""The FakeTensorMode pass in CI: every CUDA test body (one case per test function and dtype) runs on fake
'cuda' tensors on this CPU-only machine (tests/fake_cuda.py). Wrappers, fake kernels and module code
must run through; values are not checked there (the GPU run checks them)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bodies that assert a value a fake tensor cannot have; each is named with its reason. Nothing else may fail.
NEEDS_VALUES = {
    "tests/test_logit_laplace.py::test_empty_tensors_behave_like_torch": "asserts the mean of nothing is NaN",
    "tests/test_householder_qr.py::test_ill_conditioned_stays_orthonormal": "asserts orthogonality errors",
    "tests/test_diffusion_ops.py::test_threshold_ties_small_values_nan_and_inf": "asserts NaN/inf results",
    "tests/test_diffusion_ops.py::test_step_noise_is_the_reference_noise": "asserts the drawn noise",
    "tests/test_resblock_scaling.py::test_grad_scale_flags_overflow_of_the_rounding_only_its_block": "asserts flags",
    "tests/test_resblock_scaling.py::test_power_of_two_scale_round_trips_exactly": "asserts exact values",
    "tests/test_resblock_scaling.py::test_unscale_grads_matches_reference_mixed_dtypes": "asserts per-block flags",
}


def _run_pass(*extra):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "--fake-cuda", "tests",
           "--ignore=tests/test_cuda_fake.py", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1500,
                       env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    return r.returncode, r.stdout + r.stderr


def test_every_cuda_test_body_runs_on_fake_cuda_tensors():
    rc, out = _run_pass()
    summary = out.strip().splitlines()[-1]
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    unexpected = [f for f in failed if f.split("[")[0] not in NEEDS_VALUES]
    assert not unexpected, f"CUDA test bodies that fail on fake cuda tensors: {unexpected}\n{out[-6000:]}"
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    # the CUDA tests of every file that has them ran (a collection or selection bug would show here)
    ran = set(re.findall(r"^PASSED tests/(\w+\.py)::", out, re.M))
    assert {"test_sparse_attention_cuda.py", "test_decode_step.py", "test_gumbel_softmax.py", "test_logit_laplace.py",
            "test_attention_module.py", "test_dvae.py"} <= ran, ran
    assert passed >= 50, summary
    assert not re.search(r"^SKIPPED .*(cuda|CUDA|GPU)", out, re.M), out[-3000:]
    assert rc in (0, 1) and (rc == 0) == (not failed), summary
