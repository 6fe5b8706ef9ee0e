// Speaks with the GnuSpeech articulatory synthesiser (npm @echogarden/gnuspeech-wasm, GPL-3)
// for data/speech.py: node gnuspeech.mjs <gnuspeech.js> [words.txt]
//
// Reads one JSON object a line on stdin,
//   {"text": ..., "out": "x.wav", "vtl": 17.5, "pitch": -12, "breath": 0.5, "tn": 24, "tempo": 1}
// (vocal tract length in cm, reference glottal pitch in semitones, breathiness in %, glottal
// pulse fall time in %, tempo), writes a mono 16-bit WAV at the synthesiser's own rate, and
// answers "ok" or "error: <why>" on one line. With words.txt (one word a line) the
// pronouncing dictionary is cut to those words before synthesis: the synthesiser re-reads it
// for every utterance, and the cut dictionary gives the same pronunciations in half the time.
import { readFileSync, writeFileSync } from 'fs'
import { createInterface } from 'readline'
import { pathToFileURL } from 'url'

const [modulePath, wordsPath] = process.argv.slice(2)
const { default: initializer } = await import(pathToFileURL(modulePath).href)
const m = await initializer()
const dir = '/data/en'  // the package's data, embedded in its virtual file system
const read = name => m.FS.readFile(`${dir}/${name}`, { encoding: 'utf8' })
const control = read('trm_control_model.txt')
const male = read('voice_male.txt')
if (wordsPath) {
  const words = new Set(readFileSync(wordsPath, 'utf8').split('\n').filter(Boolean))
  const lines = read('MainDictionary.txt').split('\n')
  const kept = [lines[0], ...lines.slice(1).filter(l => words.has(l.split(' ')[0]))]
  m.FS.writeFile(`${dir}/MainDictionary.txt`, kept.join('\n') + '\n')
}

function cString(text) {
  const bytes = new TextEncoder().encode(text)
  const ptr = m._malloc(bytes.length + 1)
  m.HEAPU8.set(bytes, ptr)
  m.HEAPU8[ptr + bytes.length] = 0
  return ptr
}

function set(text, key, value) {
  const pattern = new RegExp(`^${key} = .*$`, 'm')
  if (!pattern.test(text)) throw new Error(`no ${key} in the voice file`)
  return text.replace(pattern, `${key} = ${value}`)
}

function speak(job) {
  let voice = set(male, 'vocal_tract_length', job.vtl)
  voice = set(voice, 'reference_glottal_pitch', job.pitch)
  voice = set(voice, 'breathiness', job.breath)
  voice = set(set(voice, 'glottal_pulse_tn_min', job.tn), 'glottal_pulse_tn_max', job.tn)
  m.FS.writeFile(`${dir}/voice_custom.txt`, voice)
  m.FS.writeFile(`${dir}/trm_control_model.txt`,
    set(set(control, 'voice_name', 'custom'), 'tempo', job.tempo))
  const args = [job.text, '/out.wav', dir, '/out-params.txt'].map(cString)
  try {
    m._GnuSpeech_synthesizeToFile(...args, 0)
  } finally {
    args.forEach(p => m._free(p))
  }
  writeFileSync(job.out, m.FS.readFile('/out.wav'))
  m.FS.unlink('/out.wav')
}

for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue
  try {
    speak(JSON.parse(line))
    process.stdout.write('ok\n')
  } catch (err) {
    process.stdout.write(`error: ${String(err.message || err).replace(/\n/g, ' ')}\n`)
  }
}
