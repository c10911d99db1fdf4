// The sample app: pick a photo, ask, the answer streams in, then time to first token and tokens/s; "Verify" runs the
// bundle's golden cases. The bundle is read from the app's external files directory (README: adb push). Not built
// or run in CI: see apps/android/README.md.
package io.edgevlm.sample

import android.graphics.Bitmap
import android.graphics.BitmapFactory
import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.rememberLauncherForActivityResult
import androidx.activity.compose.setContent
import androidx.activity.result.PickVisualMediaRequest
import androidx.activity.result.contract.ActivityResultContracts
import androidx.compose.foundation.Image
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.Spacer
import androidx.compose.foundation.layout.height
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.layout.width
import androidx.compose.foundation.rememberScrollState
import androidx.compose.foundation.verticalScroll
import androidx.compose.material3.Button
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Text
import androidx.compose.runtime.Composable
import androidx.compose.runtime.LaunchedEffect
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.rememberCoroutineScope
import androidx.compose.runtime.setValue
import androidx.compose.ui.Modifier
import androidx.compose.ui.graphics.asImageBitmap
import androidx.compose.ui.platform.LocalContext
import androidx.compose.ui.unit.dp
import io.edgevlm.android.RgbImage
import io.edgevlm.android.VlmPipeline
import io.edgevlm.android.loadImage
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext
import java.io.File

/** Where the app looks for the bundle: <external files dir>/bundle (README: adb push). */
const val BUNDLE_DIR = "bundle"

class MainActivity : ComponentActivity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContent { MaterialTheme { Screen() } }
    }
}

@Composable
fun Screen() {
    val context = LocalContext.current
    val scope = rememberCoroutineScope()
    var pipeline by remember { mutableStateOf<VlmPipeline?>(null) }
    var image by remember { mutableStateOf<RgbImage?>(null) }        // what the model sees (load_image)
    var preview by remember { mutableStateOf<Bitmap?>(null) }        // what the screen shows
    var prompt by remember { mutableStateOf("Describe the image.") }
    var answer by remember { mutableStateOf("") }
    var status by remember { mutableStateOf("loading the bundle…") }
    var busy by remember { mutableStateOf(true) }

    LaunchedEffect(Unit) {
        val dir = File(context.getExternalFilesDir(null), BUNDLE_DIR)
        status = try {
            val p = withContext(Dispatchers.Default) { VlmPipeline(io.edgevlm.android.Bundle.open(dir)) }
            pipeline = p
            "bundle loaded, checksums verified (${p.placement})"
        } catch (e: Exception) {
            "no bundle: ${e.message}"
        }
        busy = false
    }
    val picker = rememberLauncherForActivityResult(ActivityResultContracts.PickVisualMedia()) { uri ->
        if (uri != null) scope.launch {
            try {
                val (rgb, shown) = withContext(Dispatchers.IO) {
                    val bytes = context.contentResolver.openInputStream(uri)?.use { it.readBytes() }
                        ?: throw IllegalStateException("cannot read $uri")
                    loadImage(bytes, "the picked photo") to BitmapFactory.decodeByteArray(bytes, 0, bytes.size)
                }
                image = rgb
                preview = shown
            } catch (e: Exception) {
                status = e.message ?: e.toString()
            }
        }
    }

    Column(Modifier.padding(16.dp).verticalScroll(rememberScrollState())) {
        Row {
            Button(onClick = { picker.launch(PickVisualMediaRequest(ActivityResultContracts.PickVisualMedia.ImageOnly)) }) {
                Text("Pick a photo")
            }
            Spacer(Modifier.width(8.dp))
            Button(enabled = pipeline != null && !busy, onClick = {
                val p = pipeline ?: return@Button
                scope.launch {
                    busy = true
                    status = "verifying the golden cases…"
                    status = try {
                        withContext(Dispatchers.Default) { p.verify() }.format()
                    } catch (e: Exception) {
                        "verify failed: ${e.message}"
                    }
                    busy = false
                }
            }) { Text("Verify") }
        }
        preview?.let { Image(it.asImageBitmap(), contentDescription = "the photo", modifier = Modifier.height(220.dp)) }
        OutlinedTextField(value = prompt, onValueChange = { prompt = it }, label = { Text("Question") })
        Button(enabled = pipeline != null && !busy, onClick = {
            val p = pipeline ?: return@Button
            scope.launch {
                busy = true
                answer = ""
                status = "thinking…"
                status = try {
                    p.generate(image, prompt).collect { answer += it }
                    val s = p.lastStats
                    if (s == null) "" else "time to first token %.2f s · %.1f tokens/s · %d new tokens (%s)".format(
                        s.timeToFirstTokenS, s.decodeTokensPerS, s.newTokens, s.stoppedBy)
                } catch (e: Exception) {
                    e.message ?: e.toString()
                }
                busy = false
            }
        }) { Text("Ask") }
        Text(answer, style = MaterialTheme.typography.bodyLarge)
        Text(status, style = MaterialTheme.typography.bodySmall)
    }
}
