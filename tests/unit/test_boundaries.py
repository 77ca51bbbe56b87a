import subprocess
import sys


def test_the_ingress_side_never_imports_torch_or_diffusers():
    code = ("import sys, serve.app, serve.routes.generate, serve.routes.models; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
