import subprocess
import sys


def test_the_ingress_side_never_imports_torch_or_diffusers():
    code = ("import sys, serve.app, serve.routes.generate, serve.routes.models; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_types_replicas_share_with_the_ingress_need_no_web_framework():
    code = ("import sys, serve.types, serve.errors, serve.adapters, deployments.batcher; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
