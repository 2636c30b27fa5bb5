set -x
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.aa
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch,sys;print(sys.version, torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
D=.gpudata/cifar10_subset.npz
timeout 170 python3 bench.py --device cuda --arch wrn34 --batch 128 --out $OUT/bench_wrn34.json 2>&1 | tee $OUT/bench_wrn34.log
timeout 100 python3 train.py --device cuda --dataset $D --arch resnet18 --epochs 3 --milestones 2 --val 500 --out /tmp/r18 2>&1 | tee $OUT/train.log
timeout 80 python3 attack.py /tmp/r18/best.pt --attacks apgd-ce,apgd-t --device cuda --n 500 2>&1 | tail -20
timeout 150 python3 train.py --device cuda --dataset $D --arch resnet18 --epochs 2 --milestones 1 --val 500 --compile --out /tmp/r18c 2>&1 | tee $OUT/train_compile.log
timeout 100 python3 -m pytest -q -x -n 8 -p no:cacheprovider 2>&1 | tail -15
