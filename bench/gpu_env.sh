# Source this at the start of every GPU (device) call: it installs, once per machine, the
# wheels carried under .whl/ (made by bench/gpu_wheels.sh) into /tmp/site -- kept while the
# machine is held, so the 59 MB NIXL wheel can come in a call of its own -- and puts them
# and this checkout on PYTHONPATH.
for dir in .whl/*/; do
  compgen -G "$dir*.whl" > /dev/null || continue
  stamp="/tmp/site/.installed-$(basename "$dir")"
  [ -f "$stamp" ] && continue
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$dir"*.whl && touch "$stamp"
done
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# .whl/bin holds redis-server (bench/gpu_wheels.sh), found on PATH by tests/redis_server.py
[ -d .whl/bin ] && export PATH="$PWD/.whl/bin:$PATH"
# console scripts of the carried wheels (py-spy for gpu_streams.py --profile)
export PATH="/tmp/site/bin:$PATH"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())"
